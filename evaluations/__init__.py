"""The paper's evaluations, one module each: its flags (Options), data, prompts, scoring and
report; needles.py holds what the two needle tasks share, decoding.py how the tasks decode an
answer. TASKS names the tasks in the order reports list them; evaluate.py runs one, compare.py
reads them all."""
from evaluations import longbench, needlebench, niah, ppl, ruler

TASKS = {"needlebench": needlebench, "niah": niah, "ruler": ruler, "longbench": longbench,
         "ppl": ppl}
