"""Model → program: trace a torch model's primitive tensor operations into dual-rule nodes.

``graph`` traces the model with torch.fx (layers with their own rules stay whole), ``lockstep``
runs the traced graph at two batch sizes to tell per-sample values from weight-derived ones and
to catch operations that mix samples, ``functions`` and ``layers`` turn each operation into
program nodes (``builder``), and ``replay`` runs a program's operations with torch itself: the
independent oracle that validation and the reference trainer use.
"""
