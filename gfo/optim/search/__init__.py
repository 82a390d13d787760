"""Optimizers with their own update: evosax strategies (`strategies`), our GA (`ga`), discrete searches
over token ids (`discrete`), RandOpt (`randopt`) and ZO-SGD-Cons (`zo_cons`)."""
