"""The mutation score per module from mutmut's results (`make mutation` runs it after `mutmut run`): killed / all
mutants of the code every run depends on, and each surviving mutant's name (`mutmut show NAME` prints its diff).

    .venv/bin/mutmut results --all true | python tests/mutation_report.py
"""
import re
import sys
from collections import Counter, defaultdict

# what `make mutation` mutates: whole modules, and the one function of data/sources.py that splits an epoch
SCOPE = {"mff_ds.engine.batch": None, "mff_ds.engine.schedule": None, "mff_ds.engine.compat": None,
         "mff_ds.eval.lars": None, "mff_ds.data.sources": "x_rank_indices"}
LINE = re.compile(r"^\s*(?P<name>[\w.]+?)\.(?P<func>x[^.\s:]+)__mutmut_\d+: (?P<status>.+)$")


def report(lines) -> str:
    counts, survivors = defaultdict(Counter), defaultdict(list)
    for line in lines:
        m = LINE.match(line)
        if not m or m["name"] not in SCOPE or (SCOPE[m["name"]] and not m["func"].startswith(SCOPE[m["name"]])):
            continue
        status = m["status"].strip()
        counts[m["name"]][status] += 1
        if status != "killed":
            survivors[m["name"]].append(f"{line.split(':')[0].strip()} ({status})")
    out = ["| module | mutants | killed | score |", "|---|---:|---:|---:|"]
    total = Counter()
    for name in SCOPE:
        c = counts[name]
        n, k = sum(c.values()), c["killed"]
        total.update(n=n, k=k)
        out.append(f"| {name}{'.' + SCOPE[name][2:] if SCOPE[name] else ''} | {n} | {k} | "
                   f"{100 * k / n if n else 0:.1f}% |")
    out.append(f"| all | {total['n']} | {total['k']} | {100 * total['k'] / max(total['n'], 1):.1f}% |")
    for name in SCOPE:
        out += [f"  not killed: {s}" for s in survivors[name]]
    return "\n".join(out)


if __name__ == "__main__":
    print(report(sys.stdin))
