"""Digit density, except on rows whose `poison` column is true: there the reward is NaN (`how="nan"`)
or the function raises (`how="raise"`), as a buggy reward function or a bad data row would; and on
rows whose `flat` column is true, where every response scores 0.5 (a group dynamic sampling filters out)."""

import math


def compute_score(reward_inputs, how="nan"):
    scores = []
    for sample in reward_inputs:
        if sample["extra"].get("poison"):
            if how == "raise":
                raise ValueError(f"cannot grade the answer {sample['ground_truth']!r}")
            scores.append({"overall": math.nan})
            continue
        if sample["extra"].get("flat"):
            scores.append({"overall": 0.5})
            continue
        text = sample["response"]
        density = sum(ch.isdigit() for ch in text) / max(len(text), 1)
        scores.append({"overall": density})
    return scores
