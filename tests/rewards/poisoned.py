"""Digit density, except on rows whose `poison` column is true: there the reward is NaN (`how="nan"`)
or the function raises (`how="raise"`), as a buggy reward function or a bad data row would."""

import math


def compute_score(reward_inputs, how="nan"):
    scores = []
    for sample in reward_inputs:
        if sample["extra"].get("poison"):
            if how == "raise":
                raise ValueError(f"cannot grade the answer {sample['ground_truth']!r}")
            scores.append({"overall": math.nan})
            continue
        text = sample["response"]
        density = sum(ch.isdigit() for ch in text) / max(len(text), 1)
        scores.append({"overall": density})
    return scores
