"""The seed peers of ViMo, measured on the same features (SPEC section 7).

Each peer glances at many frames with a cheap backbone and focuses on a few with an expensive
one, so it reads a glance/focus pair of ``vimo-features`` files (:mod:`features.pairs`). One
file per method, readable top to bottom (arguments, model, train, evaluate, run):

* :mod:`agents.peers.liteeval` - LiteEval (coarse LSTM, fine LSTM, conditional gate);
* :mod:`agents.peers.afnet` - AFNet-style (ample branch, navigation module, focal branch).

:mod:`agents.peers.harness` holds what they share: the selection record, the one cost rule,
the result row and the uniform-at-matched-cost reference. Design notes: ``docs/peers.md``.
"""
