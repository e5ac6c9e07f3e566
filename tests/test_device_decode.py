"""Decoding on the device (`device_decode.DeviceBatch`, `sampling_batch.sample_rows`), in its eager mode
on CPU (the torch backend and the Triton interpreter), and on a GPU its CUDA-graph replay against the
eager mode: greedy rows equal `sample_next` and the host engine's output, sampled rows follow each
rule's exact probabilities (chi-square), the per-row step counter advances on the device, padding
rows never change a real row's tokens, and a seeded sequence writes the same tokens whoever shares its
batch, while sequences join and leave."""

import math

import pytest
import torch

from nanochat_fast.device_decode import DeviceBatch, bucket_size
from nanochat_fast.engine import Engine, Sequence
from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.sampling import GREEDY, SamplingConfig, new_generator, sample_next
from nanochat_fast.sampling_batch import NOISE_KEYS, RowRules, sample_rows, uniform_noise

VOCAB = 24
SAMPLED = SamplingConfig(temperature=0.9, top_k=12, top_p=0.95)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def random_model(backend, cell="lstm", device="cpu", dtype=torch.float64):
    # float64, so that a bucket's padded matmuls and the host path's exact ones agree on every argmax.
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, cell=cell), lstm_backend=backend)
    return model.to(device=device, dtype=dtype)


def greedy_tokens(model, prompt, count):
    """The first `count` tokens the host engine writes greedily after prompt."""
    engine = Engine(model, decode="host")
    engine.add([Sequence(torch.tensor(prompt), GREEDY, count)])
    return [token for _ in range(count) for _, token in engine.step()]


def run_scenario(engine, sampled_seed=None, first_tokens=14):
    """Sequences joining and leaving (stop, length, cancel) over the engine's steps; the buckets go
    1 -> 2 -> 8 -> 4 -> ... The first sequence writes first_tokens, sampled with sampled_seed if
    given. Returns per sequence (tokens, finish reason, final state)."""
    device = engine.device
    # A random model repeats itself: stop the sequences that have a stop token at their third token.
    stop_ids = {tuple(prompt): greedy_tokens(engine.model, prompt, 3)[2] for prompt in ([4], [5, 6, 7, 8])}

    def sequence(prompt, max_new_tokens, stop_id=None, sampling=GREEDY, seed=None):
        generator = None if seed is None else new_generator(device, seed)
        return Sequence(torch.tensor(prompt), sampling, max_new_tokens, stop_id=stop_id, generator=generator)

    first = sequence([1, 2, 3], first_tokens, sampling=GREEDY if sampled_seed is None else SAMPLED, seed=sampled_seed)
    joining = {0: [first], 2: [sequence([4], 5, stop_id=stop_ids[4,])],
               4: [sequence([5, 6, 7, 8], 9, stop_id=stop_ids[5, 6, 7, 8]), sequence([2], 3),
                   sequence([3, 3], 8, stop_id=1), sequence([9, 8], 12)]}
    written = {}
    for step in range(16):
        for new in joining.get(step, []):
            engine.add([new])
            written[id(new)] = []
        if step == 7:
            engine.cancel([engine.sequences[-1]])
        for sequence_written, token in engine.step():
            written[id(sequence_written)].append(token)
    everyone = [new for step in sorted(joining) for new in joining[step]]
    return [(written[id(new)], new.finish_reason, new.state) for new in everyone]


def assert_same_outcomes(outcomes, expected):
    for (tokens, reason, state), (expected_tokens, expected_reason, expected_state) in zip(outcomes, expected,
                                                                                           strict=True):
        assert tokens == expected_tokens and reason == expected_reason
        for part, expected_part in zip(state, expected_state, strict=True):
            torch.testing.assert_close(part, expected_part)


@pytest.mark.parametrize("backend, cell", [("torch", "lstm"), ("torch", "gru"), ("triton", "lstm")])
def test_greedy_device_decode_equals_the_host_engine(backend, cell):
    model = random_model(backend, cell)
    host = run_scenario(Engine(model, decode="host"))
    assert any(reason == "stop" for _, reason, _ in host) and any(reason == "cancelled" for _, reason, _ in host)
    assert_same_outcomes(run_scenario(Engine(model, decode="eager")), host)


def test_greedy_rows_beside_a_sampled_one_equal_the_host_engine():
    # The batch decodes with the sampling rules while the sampled row is in it (6 steps), by argmax after.
    model = random_model("torch")
    host = run_scenario(Engine(model, decode="host"), sampled_seed=3, first_tokens=6)
    assert_same_outcomes(run_scenario(Engine(model, decode="eager"), sampled_seed=3, first_tokens=6)[1:], host[1:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_greedy_rows_take_what_sample_next_takes(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (64, VOCAB), generator=generator).to(dtype)  # many ties: the lowest id wins
    configs = [GREEDY if row % 3 else SAMPLED for row in range(64)]
    tokens = sample_rows(logits, RowRules.of(configs, VOCAB, "cpu"), torch.arange(64),
                         torch.zeros(64, dtype=torch.long))
    greedy = [row for row, config in enumerate(configs) if config.greedy]
    assert torch.equal(tokens[greedy], sample_next(logits[greedy], GREEDY))


def rule_probabilities(logits, config):
    """The exact distribution of sample_next's rule, in float64 Python: top-k, then top-p."""
    scaled = [value / config.temperature for value in logits.tolist()]
    order = sorted(range(len(scaled)), key=lambda token: -scaled[token])[:config.top_k or len(scaled)]
    weights = [math.exp(scaled[token] - scaled[order[0]]) for token in order]
    probs = [weight / sum(weights) for weight in weights]
    kept, mass = [], 0.0
    for token, prob in zip(order, probs, strict=True):
        if config.top_p is not None and mass >= config.top_p:
            break
        kept.append((token, prob))
        mass += prob
    total = sum(prob for _, prob in kept)
    return {token: prob / total for token, prob in kept}


def chi_square_critical(degrees, z=3.719):
    """The chi-square value exceeded with probability 1e-4 (z: the normal's), by Wilson and Hilferty."""
    return degrees * (1 - 2 / (9 * degrees) + z * math.sqrt(2 / (9 * degrees))) ** 3


@pytest.mark.parametrize("config", [SamplingConfig(0.7), SamplingConfig(1.0, top_k=5), SamplingConfig(1.3, top_p=0.8),
                                    SamplingConfig(0.9, top_k=8, top_p=0.7)],
                         ids=["temperature", "top-k", "top-p", "top-k-top-p"])
def test_sampled_rows_follow_the_rules_exact_probabilities(config):
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))  # every kept token drawn 20+ times
    expected = rule_probabilities(logits, config)
    seeds, steps = 200, 100  # 20,000 draws: 200 streams of 100 steps each
    rows = seeds * steps
    tokens = sample_rows(logits.expand(rows, -1), RowRules.of([config] * rows, VOCAB, "cpu"),
                         torch.randint(NOISE_KEYS, (seeds,),
                                       generator=torch.Generator().manual_seed(2)).repeat_interleave(steps),
                         torch.arange(steps).repeat(seeds))
    counts = torch.bincount(tokens, minlength=VOCAB).tolist()
    assert {token for token, count in enumerate(counts) if count} <= set(expected)  # filtered tokens never drawn
    statistic = sum((counts[token] - rows * prob) ** 2 / (rows * prob) for token, prob in expected.items())
    assert statistic < chi_square_critical(len(expected) - 1), (statistic, counts, expected)


def test_noise_is_a_function_of_key_and_counter():
    keys = torch.tensor([0, 0, 5, NOISE_KEYS - 1, 0])
    counters = torch.tensor([0, 1, 0, 0, 0])
    noise = uniform_noise(keys, counters)
    assert noise[0] == noise[4] and len(set(noise[:4].tolist())) == 4
    assert ((0 <= noise) & (noise < 1)).all()


def test_step_counters_advance_on_the_device_per_row():
    batch = DeviceBatch(random_model("torch"), use_graphs=False)
    logits = torch.zeros(2, VOCAB, dtype=torch.float64)
    state = random_model("torch").initial_state(2, dtype=torch.float64)
    sequences = [Sequence(torch.tensor([1]), SAMPLED, generator=new_generator("cpu", seed)) for seed in (1, 2)]
    batch.add(logits[:1], tuple(part[:, :1] for part in state), sequences[:1])
    for _ in range(3):
        batch.step()
    batch.add(logits[1:], tuple(part[:, 1:] for part in state), sequences[1:])
    batch.step()
    assert batch.buffers.counters.tolist() == [4, 1]
    batch.keep([1])
    batch.step()
    assert batch.buffers.counters.tolist() == [2]  # the row kept its own count into its new bucket


def test_padding_rows_never_change_a_real_rows_tokens():
    model = random_model("torch")
    state = tuple(torch.randn(part.shape, dtype=torch.float64) for part in model.initial_state(3, dtype=torch.float64))
    logits = torch.randn(3, VOCAB, dtype=torch.float64)
    written = []
    for garbage in (False, True):
        batch = DeviceBatch(model, use_graphs=False)
        batch.add(logits, state, [Sequence(torch.tensor([1]), config, generator=new_generator("cpu", 5))
                                  for config in (GREEDY, SAMPLED, SamplingConfig(1.5))])
        assert batch.buffers.logits.size(0) == bucket_size(3) == 4
        tokens = []
        for _ in range(10):
            if garbage:  # row 3 is padding: whatever it holds, rows 0-2 must not see it
                with torch.inference_mode():  # where the buffers may be written
                    batch.buffers.logits[3] = float("nan")
                    for part in batch.buffers.state:
                        part[:, 3] = 1e30
                    batch.buffers.rules.temperature[3] = 2.0
            tokens.append(batch.step())
        written.append(tokens)
    assert written[0] == written[1]


def test_a_seeded_sequence_writes_the_same_tokens_whoever_shares_its_batch():
    model = random_model("torch")
    alone = Engine(model, decode="eager")
    sequence = Sequence(torch.tensor([1, 2, 3]), SAMPLED, 14, generator=new_generator("cpu", 3))
    alone.add([sequence])
    tokens = [token for _ in range(14) for _, token in alone.step()]
    shared = run_scenario(Engine(model, decode="eager"), sampled_seed=3)
    assert shared[0][0] == tokens and len(set(tokens)) > 1


def test_cpu_decodes_on_the_host_and_graphs_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert Engine(random_model("torch")).decode == "host"  # on CPU the engine is as it was
    with pytest.raises(ValueError, match="replays CUDA graphs"):
        Engine(random_model("torch"), decode="graph")


@needs_gpu
@pytest.mark.parametrize("backend, dtype", [("triton", torch.float32), ("triton", torch.bfloat16),
                                            ("torch", torch.float32)])
def test_graph_replay_equals_the_eager_mode(backend, dtype):
    model = random_model(backend, device="cuda", dtype=dtype)
    for sampled_seed in (None, 3):
        eager = run_scenario(Engine(model, decode="eager"), sampled_seed)
        assert_same_outcomes(run_scenario(Engine(model, decode="graph"), sampled_seed), eager)


@needs_gpu
def test_graph_decode_follows_new_weights():
    model = random_model("triton", device="cuda", dtype=torch.float32)
    engine = Engine(model, decode="graph")
    run_scenario(engine)  # captures the buckets' graphs
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-1.5)  # in place: the graphs' addresses stay, the derived tables do not
    assert_same_outcomes(run_scenario(engine), run_scenario(Engine(model, decode="eager")))
