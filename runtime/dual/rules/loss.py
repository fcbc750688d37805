"""The loss every last module ends with."""
from __future__ import annotations


def cross_entropy(ops, logits, logits_dot, onehot, dual: bool, per_sample: bool = False):
    """Mean cross-entropy from one-hot labels, and its directional derivative per tangent.

    Written with ReduceMax/Exp/Log/ReduceSum (no NLL/SoftmaxCrossEntropy ops, which TensorRT
    does not parse): loss = mean(lse(z) − Σ z·Y); dloss_j = mean(Σ (softmax(z) − Y)·ż_j).
    ``per_sample`` keeps the derivative of each sample's own loss, d_nj = Σ (softmax(z_n) − Y_n)·ż_nj,
    shape (m, N): what activity perturbation needs (runtime/dual/activity.py).
    """
    zmax = ops.max(logits, [1])
    zc = ops.sub(logits, zmax)
    lse = ops.log(ops.sum(ops.exp(zc), [1]))  # (N, 1), relative to zmax
    per = ops.sub(lse, ops.sum(ops.mul(zc, onehot), [1]))
    loss = ops.mean(per, [0, 1], keepdims=False)
    if not dual or logits_dot is None:
        return loss, None
    probs = ops.exp(ops.sub(zc, lse))
    dloss = ops.sum(ops.mul(ops.sub(probs, onehot), logits_dot), [2], keepdims=False)  # (m, N)
    return loss, dloss if per_sample else ops.mean(dloss, [1], keepdims=False)
