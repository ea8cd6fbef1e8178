"""The paper's evaluations, one module each: its flags (Options), data, prompts, scoring and
report. TASKS names them in the order reports list them; evaluate.py runs one, compare.py
reads them all."""
from evaluations import longbench, needlebench, niah, ppl, ruler

TASKS = {"needlebench": needlebench, "niah": niah, "ruler": ruler, "longbench": longbench,
         "ppl": ppl}
