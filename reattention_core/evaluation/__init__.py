"""Long-context evaluation: pass key and RULER-style needles over length x depth grids, and
corpus QA (whole corpus in context vs BM25-RAG vs truncated full attention).

Command line: ``reattention eval passkey|ruler|qa|report ...`` (`reattention_core.evaluation.cli`).
"""

from reattention_core.evaluation.haystack import Haystack
from reattention_core.evaluation.qa import QA_MODES, QAGrid, run_qa
from reattention_core.evaluation.results import ResultsFile, read_rows
from reattention_core.evaluation.runner import NeedleGrid, RunReport, even_depths, run_grid
from reattention_core.evaluation.scoring import found, score
from reattention_core.evaluation.tasks import RULER_TASKS, TASKS, Sample, make_sample

__all__ = [
    "QA_MODES",
    "RULER_TASKS",
    "TASKS",
    "Haystack",
    "NeedleGrid",
    "QAGrid",
    "ResultsFile",
    "RunReport",
    "Sample",
    "even_depths",
    "found",
    "make_sample",
    "read_rows",
    "run_grid",
    "run_qa",
    "score",
]
