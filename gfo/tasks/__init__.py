"""Built-in tasks, each making its own data from a seed (see `gfo.tasks.base.Task`)."""

from gfo.tasks.base import Task
from gfo.tasks.classification import PromptClassification
from gfo.tasks.countdown import Countdown
from gfo.tasks.grammar_lm import GrammarLM, TextLM
from gfo.tasks.gsm8k import GSM8K
from gfo.tasks.sequence import Arithmetic, Reverse, Sort
from gfo.tasks.tagging import Tagging

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Arithmetic, Sort, Reverse, Countdown, GrammarLM, TextLM,
                                                          PromptClassification, Tagging, GSM8K)}

__all__ = ["Task", "TASKS", "Arithmetic", "Sort", "Reverse", "Countdown", "GrammarLM", "TextLM",
           "PromptClassification", "Tagging", "GSM8K"]
