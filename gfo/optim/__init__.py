"""The optimizer axis: one protocol, and every method behind it.

`protocol` (the `Estimator` and `OptimizerProtocol` contracts, state sharding), `registry` (method name →
constructor and config fields), `optimizer` (`gfo.Optimizer`: an estimator + an optax transform),
`estimators/` (one file per direction estimator), `search/` (optimizers with their own update: evosax
strategies, GA, discrete searches, RandOpt, ZO-SGD-Cons), `noise` (which key a member / leaf / layer /
row gets; `models.noise` turns a key into numbers), `population` (an implicit population and its
regenerated noise sums), `evaluate` (the one population-evaluation path and the metrics vocabulary),
`update` (a pseudo-gradient made and applied leaf by leaf), `shaping` (fitness shaping), `plan` (what a
step decides from its arguments: the chunk) and `minimize` (`gfo.minimize`).
"""
