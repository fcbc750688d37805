"""The loss every last module ends with."""
from __future__ import annotations


def cross_entropy(ops, logits, logits_dot, onehot, dual: bool, per_sample: bool = False):
    """Mean cross-entropy from one-hot labels, and its directional derivative per tangent.

    Written with ReduceMax/Exp/Log/ReduceSum (no NLL/SoftmaxCrossEntropy ops, which TensorRT
    does not parse): loss = mean(lse(z) − Σ z·Y); dloss_j = mean(Σ (softmax(z) − Y)·ż_j).
    ``per_sample`` keeps the derivative of each sample's own loss, d_nj = Σ (softmax(z_n) − Y_n)·ż_nj,
    shape (m, N): what activity perturbation needs (runtime/dual/activity.py).
    """
    zc, lse = _shifted(ops, logits)
    per = ops.sub(lse, ops.sum(ops.mul(zc, onehot), [1]))
    loss = ops.mean(per, [0, 1], keepdims=False)
    if not dual or logits_dot is None:
        return loss, None
    dloss = ops.sum(ops.mul(_residual(ops, zc, lse, onehot), logits_dot), [2], keepdims=False)  # (m, N)
    return loss, dloss if per_sample else ops.mean(dloss, [1], keepdims=False)


def residual(ops, logits, onehot):
    """softmax(z) − Y, (N, K): each sample's loss derivative along a logit tangent ż is its dot with ż."""
    zc, lse = _shifted(ops, logits)
    return _residual(ops, zc, lse, onehot)


def _shifted(ops, logits):
    """z − max z and the log-sum-exp relative to it, (N, 1): the stable pieces of log-softmax."""
    zc = ops.sub(logits, ops.max(logits, [1]))
    return zc, ops.log(ops.sum(ops.exp(zc), [1]))


def _residual(ops, zc, lse, onehot):
    return ops.sub(ops.exp(ops.sub(zc, lse)), onehot)
