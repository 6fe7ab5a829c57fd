"""Which base the adapter is merged into (MERGE_BASE), and the manifest's record of why."""

from __future__ import annotations


def merge_candidates(merge_base: str, trained_4bit: bool) -> list[str]:
    """The bases to merge into: MERGE_BASE=auto means both, but only a 4-bit-trained adapter has an NF4 base."""
    if merge_base == "auto":
        return ["original", "nf4"] if trained_4bit else ["original"]
    return [merge_base]


def unmeasured_merge_base(setting: str, load_in_4bit: bool | None) -> dict:
    """LADDER=false: the merge base without scoring it; ``auto`` takes the NF4 round trip for a 4-bit adapter.

    NF4 was the closer base on every model measured (docs/benchmarks.md).
    """
    if setting != "auto":
        chosen, why = setting, f"MERGE_BASE={setting}"
    elif load_in_4bit:
        chosen, why = "nf4", "MERGE_BASE=auto, and the adapter was trained in 4-bit"
    else:
        trained = ("no train manifest says the adapter was trained in 4-bit" if load_in_4bit is None
                   else "the adapter was trained on a full-precision base")
        chosen, why = "original", f"MERGE_BASE=auto, and {trained}"
    return {"setting": setting, "trained_in_4bit": load_in_4bit, "chosen": chosen,
            "reason": f"{chosen} ({why}; not measured (LADDER=false))", "candidates": {}}


def merge_base_record(setting: str, load_in_4bit: bool | None, candidates: list[str], scores: dict, chosen: str) -> dict:
    """What the manifest says about the merge base: every candidate's rung-2 numbers and why ``chosen`` won."""
    if len(candidates) > 1:
        reason = (f"{chosen} (MERGE_BASE=auto: KL from the model as trained "
                  + ", ".join(f"{c} {scores[c].kl:.5f}" for c in candidates) + "; the lower wins)")
    elif setting == "auto":
        why = ("no train manifest says the adapter was trained in 4-bit" if load_in_4bit is None
               else "the adapter was trained on a full-precision base")
        reason = f"original (MERGE_BASE=auto, and {why}: there is no NF4 base to compare)"
    else:
        reason = f"{chosen} (MERGE_BASE={setting})"
    return {
        "setting": setting,
        "trained_in_4bit": load_in_4bit,
        "chosen": chosen,
        "reason": reason,
        "candidates": {c: {k: v for k, v in scores[c].to_json().items() if k in ("nll", "perplexity", "kl", "top1")}
                       for c in candidates},
    }
