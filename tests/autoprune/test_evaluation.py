import dataclasses

import numpy as np
import pytest
import torch

from autoprune.costs import uniform_policy
from autoprune.errors import AutopruneError
from autoprune.evaluation import (AUTO_SCORE_STEPS, EvaluatorConfig, PolicyEvaluator, resolve_score_steps)

FAST = dict(bn_batches=2, bn_batch_size=32, val_images=128)


def test_short_finetune_before_scoring_is_deterministic_and_leaves_other_random_streams_alone(
        trained_tiny, synthetic_data):
    plain = PolicyEvaluator(trained_tiny, synthetic_data, EvaluatorConfig(**FAST))
    tuned = PolicyEvaluator(trained_tiny, synthetic_data, EvaluatorConfig(**FAST, score_steps=5, score_lr=0.05))
    policy = uniform_policy(tuned.description, 0.3)
    np.random.seed(123)
    torch.manual_seed(123)
    before = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    score = tuned.accuracy(policy)
    assert np.array_equal(np.random.get_state()[1], before[0]) and torch.equal(torch.get_rng_state(), before[1])
    again = PolicyEvaluator(trained_tiny, synthetic_data, EvaluatorConfig(**FAST, score_steps=5, score_lr=0.05))
    assert again.accuracy(policy) == score
    assert score != plain.accuracy(policy)  # the steps changed the network that was scored
    assert tuned.timings["short_finetune"] > 0
    with pytest.raises(AutopruneError, match="score steps"):
        PolicyEvaluator(trained_tiny, synthetic_data, EvaluatorConfig(**FAST, score_steps=-1))


def test_auto_scoring_fine_tunes_only_where_the_uniform_policy_scores_near_chance(trained_tiny, synthetic_data):
    evaluator = PolicyEvaluator(trained_tiny, synthetic_data, EvaluatorConfig(**FAST))
    mild = uniform_policy(evaluator.description, 1.0)
    steps, info = resolve_score_steps(evaluator, mild)
    assert steps == 0 and info["uniform_accuracy"] == info["unpruned_accuracy"]
    harsh = {g.name: 1e-9 for g in evaluator.description.groups}  # one channel per group: chance
    steps, info = resolve_score_steps(evaluator, harsh)
    assert info["uniform_accuracy"] < 0.5 * info["unpruned_accuracy"]
    assert steps == AUTO_SCORE_STEPS and evaluator.config.score_steps == 0  # decided, not yet set


def test_score_steps_train_on_augmented_batches_unless_told_not_to(trained_tiny, synthetic_data):
    data = dataclasses.replace(synthetic_data, crop_padding=2)  # the generated set has no augmentation of its own
    config = dict(**FAST, score_steps=3, score_lr=0.05)
    augmented = PolicyEvaluator(trained_tiny, data, EvaluatorConfig(**config))
    plain = PolicyEvaluator(trained_tiny, data, EvaluatorConfig(**config, score_augment=False))
    assert augmented.config.score_augment  # the default
    policy = uniform_policy(augmented.description, 0.4)
    augmented.accuracy(policy), plain.accuracy(policy)
    pairs = list(zip(augmented._score_batches, plain._score_batches))
    assert len(pairs) == 3
    assert all(torch.equal(ya, yp) for (_, ya), (_, yp) in pairs)  # the same images drawn
    assert not all(torch.equal(xa, xp) for (xa, _), (xp, _) in pairs)  # but cropped differently
    again = PolicyEvaluator(trained_tiny, data, EvaluatorConfig(**config))
    again.accuracy(policy)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again._score_batches, augmented._score_batches))
