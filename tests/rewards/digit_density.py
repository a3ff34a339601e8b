"""A reward a random-init tiny model already earns now and then: the share of digit characters."""


def compute_score(reward_inputs, **kwargs):
    scores = []
    for sample in reward_inputs:
        text = sample["response"]
        density = sum(ch.isdigit() for ch in text) / max(len(text), 1)
        scores.append({"overall": density, "digit_density": density})
    return scores
