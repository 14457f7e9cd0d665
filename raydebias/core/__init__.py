"""The engine's core: what a stage returns (:class:`StageResult`), what it is given (:class:`RunContext`) and a
graph node (:class:`Node`). It imports no stage or method, so every stage module can import it and the pipeline
(``raydebias.pipeline``) can import every stage without an import circle."""

from raydebias.core.context import Node, RunContext, StageResult

__all__ = ["Node", "RunContext", "StageResult"]
