"""Break known lines one at a time and check that the tests meant to guard them fail.

``python tests/mutations.py`` (from the repository root, a few minutes): each mutation edits
one line of the source, runs the tests that should notice, restores the file, and reports
whether they failed as they should. Exit status 1 when a mutation survives.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (file, text to replace, replacement, pytest arguments that must then fail)
MUTATIONS = [
    ("reducers/shorten.py", "                     blocked=cut.blocked)", "                     blocked=torch.zeros_like(cut.blocked))",
     ["tests/test_reducers_apply.py", "tests/test_reducers_families.py", "-x"]),
    ("reducers/scores.py", "nearest = slots.gather(1, similarity.argmax(2))", "nearest = slots.gather(1, similarity.argmin(2))",
     ["tests/test_reducers_apply.py", "-x", "-k", "proportional_attention"]),
    ("probes/adapters.py", "if known is not None and known[0] == snapshot:", "if known is not None:",
     ["tests/test_reducers_schedule.py", "-k", "changed_in_place"]),
    ("reducers/cost.py", "2 * n * n * self.q_width", "6 * n * n * self.q_width",
     ["tests/test_reducers_derive.py", "-k", "self_consistent"]),
    ("reports/words.py", 'return (f"prune visual tokens {where}', 'return ("WRONG" or f"prune visual tokens {where}',
     ["tests/test_reports.py", "-k", "vlm_report"]),
    ("reducers/apply.py", "decoding = compat.is_decode_step(kwargs)", "decoding = False", ["tests/test_reducers_apply.py", "-x"]),
    ("attnflow/fileio.py", "_share(Path(tmp), 0o666)", "pass", ["tests/test_fileio.py"]),
    ("probes/stats.py", "return (1 / self.n_seen.clamp_min(1))[:, None]", "return (1 / self.n_seen.clamp_min(2))[:, None]",
     ["tests/test_record.py", "-x", "-k", "summary_matches"]),
    ("probes/adapters.py", "causal=False, text_config=None, leading_cls=True", "causal=False, text_config=None",
     ["tests/test_record.py", "tests/test_trace_io.py", "-x", "-k", "bert"]),
    ("attnflow/parallel.py", "range(self.rank * n // self.size,", "range(self.rank * n // self.size - 1,",
     ["tests/test_parallel.py", "-k", "shares"]),
    ("analyses/knockout.py", "kl, rel, correct, base_correct = (parallel.fill(a)", "_ = (parallel.fill(a)",
     ["tests/test_parallel.py", "-x", "-k", "analyse_derive"]),
    ("reducers/plan.py", "self.leaving.add(layer + 1)", "pass", ["tests/test_reducers_dynamic.py", "-x"]),
    ("probes/fused.py", "p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)", "p = tl.where(ok, tl.exp(s - lse[:, None] + 1e-4), 0.0)",
     ["tests/test_fused.py"]),
    ("reducers/scores.py", "above = text & (relevance > mean)", "above = text & (relevance < mean)",
     ["tests/test_reducers_apply.py", "-k", "raters"]),
    ("reducers/scores.py", "merged[b, targets] = states[b, targets] + group_means(states[b, others[chosen]], assign, contextual)",
     "merged[b, targets] = states[b, targets]", ["tests/test_reducers_apply.py", "-x", "-k", "visionzip_keeps"]),
    ("reducers/scores.py", "merged[rows, slots] = means[real]", "merged[rows, slots] = states[rows, slots]",
     ["tests/test_reducers_apply.py", "-x", "-k", "recycling_keeps"]),
    ("reducers/scores.py", "counted = np.arange(width) < k", "counted = np.arange(width) <= k",
     ["tests/test_reducers_apply.py", "-x", "-k", "density_peaks"]),
    ("reducers/plan.py", "return self.decoding and self.decode_steps > 0 and self.unchanged_decode",
     "return self.decoding and self.decode_steps > 0", ["tests/test_reducers_apply.py", "-x", "-k", "change_nothing"]),
    ("reducers/validation.py", "q = (root - big_b) / (4 * n)", "q = (root + big_b) / (4 * n)",
     ["tests/test_reducers_validation.py", "-k", "paired_net_drop or sequential or net_drop_certifies"]),
    ("reducers/scores.py", "picks[step] = pick = score.argmax(1)",
     "picks[step] = pick = r - 1 - score[:, ::-1].argmax(1)",
     ["tests/test_reducers_apply.py", "-k", "farthest_point"]),
    ("reducers/derive.py", "            break\n        accepted = c", "            continue\n        accepted = c",
     ["tests/test_reducers_derive.py", "-k", "last_of_the_sequence"]),
    ("reducers/derive.py", "best = min(found, key=lambda c: (cost(c), search.searched_kl(c)))",
     "best = min(found, key=cost)", ["tests/test_reducers_derive.py", "-k", "lower_search_kl"]),
    ("reducers/derive.py", "keep=1 - share * (1 - s.keep)", "keep=share * s.keep",
     ["tests/test_reducers_derive.py", "-k", "scales_the_searchs_result"]),
    ("reducers/speed.py", "decode[clock].append((times[-1] - times[0]) / new_tokens)",
     "decode[clock].append((times[-1] - times[0]) / (new_tokens + 1))", ["tests/test_reducers_speed.py"]),
    ("reducers/speed.py", "for i, w in enumerate(ws))", "for i, w in enumerate(ws[1:]))",
     ["tests/test_benchmarks.py", "-k", "attainable"]),
    ("reducers/cost.py", "macs += left * left * shape.hidden", "macs += left * kept * shape.hidden",
     ["tests/test_reducers_cost.py", "-k", "scoring"]),
    ("reducers/cost.py", '(cost["flops_ratio"] + cost["scoring_flops_ratio"])', '(cost["flops_ratio"])',
     ["tests/test_reducers_cost.py", "tests/test_reducers_cli.py", "-x"]),
    ("reducers/derive.py", "softmax(-1).amax(-1)", "softmax(-1).mean(-1)", ["tests/test_reducers_derive.py", "-k", "flips"]),
    ("reducers/validation.py", "p = np.clip(np.asarray(top, dtype=np.float64), 0.5, 1.0)",
     "p = np.clip(np.asarray(top, dtype=np.float64), 0.55, 1.0)", ["tests/test_reducers_validation.py", "-k", "flip"]),
    ("reducers/derive.py", "judged = budget if floor is None else budget.with_flips(floor)", "judged = budget",
     ["tests/test_reducers_derive.py", "-k", "flips"]),
    ("reducers/derive.py", "if n >= max(needed, flips):", "if n >= needed:", ["tests/test_reducers_derive.py", "-k", "flips"]),
    ("reducers/validation.py", "return max_kl / floor if floor > max_kl else None",
     "return max_kl / floor if floor > 2 * max_kl else None", ["tests/test_reducers_validation.py", "-k", "flip"]),
    ("attnflow/pipeline.py", "kl.with_flips(math.log(2)), Budget(", "kl, Budget(",
     ["tests/test_pipeline.py", "-k", "default_budget"]),
    ("benchmarks/prefill_profile.py", "if name in SYNC_OPS or any(", "if name in SYNC_OPS and any(",
     ["tests/test_benchmarks.py", "-k", "host_syncs"]),
    ("benchmarks/schedules.py", '"fresh_loss_ok": None if fresh_upper is None else fresh_upper <= loss + 1e-9',
     '"fresh_loss_ok": None if fresh_upper is None else True', ["tests/test_benchmarks.py", "-k", "targets"]),
]


def survives(path: str, old: str, new: str, args: list[str]) -> bool:
    """Apply one mutation, run ``args`` under pytest, restore; True when the tests still pass."""
    file = ROOT / path
    original = file.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"{path}: the text to mutate is not there exactly once: {old!r}")
    file.write_text(original.replace(old, new))
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                              cwd=ROOT, capture_output=True, text=True)
    finally:
        file.write_text(original)
    return done.returncode == 0


def main() -> int:
    alive = 0
    for path, old, new, args in MUTATIONS:
        ok = not survives(path, old, new, args)
        alive += not ok
        print(f"{'caught  ' if ok else 'SURVIVED'} {path}: {old!r} -> {new!r}")
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main())
