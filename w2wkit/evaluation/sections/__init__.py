"""The seven sections of an evaluation run, one module each, each with ``run(context)``.

``space`` (the fitted space; ``run(context, space, seconds)``), ``inversion``,
``editing``, ``ood`` (stylised inputs), ``sampling``, ``scaling`` and
``fidelity`` (zoo fidelity). :func:`w2wkit.evaluation.run_eval` runs them.
"""
