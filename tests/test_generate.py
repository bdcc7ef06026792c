"""Generation over a Runner: padding, greedy, sampling controls, EOS."""

from __future__ import annotations

import numpy as np
import pytest

from gptkiln.errors import UsageError
from gptkiln.runtime.generate import GenerationConfig, choose_next, generate, left_pad
from gptkiln.targets import get_target


@pytest.fixture(scope="module")
def runner(reference_build):
    result, output = reference_build
    return get_target("onnxruntime").load(output / "onnxruntime", result.spec)


def test_left_pad_positions_count_from_the_first_real_token():
    batch = left_pad([[7, 8, 9], [5]], pad_token_id=0)
    assert batch.input_ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batched_greedy_equals_each_prompt_alone(runner):
    prompts = [[100, 200, 300, 400, 500], [17], [42, 43, 44]]
    config = GenerationConfig(max_new_tokens=12)
    batched = generate(runner, prompts, config)
    assert batched == [generate(runner, [p], config)[0] for p in prompts]


def test_sampling_is_reproducible_by_seed_and_varies_across_seeds(runner):
    prompt = [[100, 200, 300]]
    config = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, seed=3)
    assert generate(runner, prompt, config) == generate(runner, prompt, config)
    others = {tuple(generate(runner, prompt, GenerationConfig(**{**vars(config), "seed": s}))[0]) for s in range(4)}
    assert len(others) > 1


def test_top_k_1_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50))
    greedy = logits.argmax(-1)
    assert (choose_next(logits, GenerationConfig(do_sample=True, top_k=1), rng) == greedy).all()
    assert (choose_next(logits, GenerationConfig(do_sample=True, top_p=1e-6), rng) == greedy).all()


def test_top_k_never_samples_outside_the_k_best():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 100))
    best = set(np.argsort(-logits[0])[:5].tolist())
    picks = {int(choose_next(logits, GenerationConfig(do_sample=True, top_k=5), rng)[0]) for _ in range(200)}
    assert picks <= best and len(picks) > 1


def test_eos_stops_only_the_row_that_emitted_it(runner):
    prompts = [[100, 200, 300], [42, 43]]
    free = generate(runner, prompts, GenerationConfig(max_new_tokens=10))
    eos = free[0][2]  # make row 0's third token the EOS
    stopped = generate(runner, prompts, GenerationConfig(max_new_tokens=10, eos_token_ids=(eos,)))
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    expected_row1 = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert stopped[1] == expected_row1


def test_any_of_several_eos_ids_stops_a_row_and_each_token_is_seen_as_chosen(runner):
    prompts = [[100, 200, 300], [42, 43]]
    free = generate(runner, prompts, GenerationConfig(max_new_tokens=10))
    stops = (free[0][3], free[1][1])  # a different stop token for each row (instruct models list several)
    seen: list[tuple[int, int]] = []
    stopped = generate(runner, prompts, GenerationConfig(max_new_tokens=10, eos_token_ids=stops),
                       on_token=lambda row, token: seen.append((row, token)))
    for row, prompt_tokens in enumerate(free):
        first = min(prompt_tokens.index(stop) for stop in stops if stop in prompt_tokens)
        assert stopped[row] == prompt_tokens[: first + 1]
        assert [token for r, token in seen if r == row] == stopped[row]


def test_prompt_plus_new_tokens_beyond_max_positions_is_a_usage_error(runner):
    prompt = [[7] * (runner.spec.max_positions - 4)]
    with pytest.raises(UsageError, match="exceeds the model's 512 positions"):
        generate(runner, prompt, GenerationConfig(max_new_tokens=5))
    assert len(generate(runner, prompt, GenerationConfig(max_new_tokens=4))[0]) == 4


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    rng = np.random.default_rng(2)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    picks = {int(choose_next(logits, GenerationConfig(do_sample=True, top_p=0.75), rng)[0]) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.15 and 0.05 are never drawn


@pytest.mark.parametrize("config", [GenerationConfig(max_new_tokens=0),
                                    GenerationConfig(do_sample=True, temperature=0),
                                    GenerationConfig(do_sample=True, top_p=0)])
def test_bad_generation_settings_are_usage_errors(config):
    with pytest.raises(UsageError):
        config.validate()
