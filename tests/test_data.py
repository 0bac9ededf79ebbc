"""The data pipeline: sources, formats and their loss masks, bad input, packing, order, cache.

Everything runs on small local files and the bundled character-level tokenizer; each
test points the tokenisation cache at its own temporary directory.
"""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from kernels.models import DecoderConfig, DecoderLM
from kernels.reference import IGNORE_INDEX
from launcher import data
from launcher.config import DataConfig
from launcher.data import encoding, formats
from launcher.data import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, FALLBACK_CHAT_TEMPLATE, Example,
                           GlobalBatchSampler, PackedSequence, TrainSet, collate, load_splits, load_tokenizer,
                           pack_sequences)
from launcher.demo_task import DEMO_DIR, make_splits

CHAT = [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"},
        {"role": "user", "content": "copy: ab"}, {"role": "assistant", "content": "ab"}]


@pytest.fixture
def tok():
    return load_tokenizer(None, None)  # fresh per test: chat tests set a template on it


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config(tmp_path, path=None, **overrides) -> DataConfig:
    overrides.setdefault("name", "test")
    return DataConfig(path=str(path) if path else None, cache_dir=str(tmp_path / "cache"), **overrides)


def load(tmp_path, tok, rows=None, seq_len=256, seed=0, **overrides):
    path = write_jsonl(tmp_path / "train.jsonl", rows) if rows is not None else overrides.pop("path")
    return load_splits(config(tmp_path, path, **overrides), tok, seq_len, seed)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def target_text(tok, example) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=False)


# --------------------------------------------------------------------------- formats


def test_text_every_token_is_a_target(tmp_path, tok):
    train, _ = load(tmp_path, tok, [{"text": "abc def"}], format="text")
    token_ids = [tok.bos_token_id, *ids(tok, "abc def"), tok.eos_token_id]
    assert train[0].input_ids == token_ids[:-1]
    assert train[0].labels == token_ids[1:]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_prompt_completion_loss_on_the_completion_only(tmp_path, tok, train_on_prompt):
    rows = [{"question": "copy: ab\n", "answer": "ab"}]
    train, _ = load(tmp_path, tok, rows, prompt_column="question", completion_column="answer",
                    train_on_prompt=train_on_prompt)
    prompt, completion = ids(tok, "copy: ab\n"), ids(tok, "ab")
    token_ids = [tok.bos_token_id, *prompt, *completion, tok.eos_token_id]
    example = train[0]
    assert example.input_ids == token_ids[:-1]
    expected = token_ids[1:] if train_on_prompt else [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]
    assert example.labels == expected
    assert example.prompt_len == 1 + len(prompt)


def test_alpaca_uses_the_standard_prompt_with_and_without_input(tmp_path, tok):
    rows = [{"instruction": "sort", "input": "cba", "output": "abc"},
            {"instruction": "say hi", "input": "", "output": "hi"}]
    train, _ = load(tmp_path, tok, rows, format="alpaca")
    prompts = [ALPACA_PROMPT.format(instruction="sort", input="cba"),
               ALPACA_PROMPT_NO_INPUT.format(instruction="say hi")]
    for example, prompt, output in zip((train[0], train[1]), prompts, ("abc", "hi")):
        assert example.input_ids[: example.prompt_len] == [tok.bos_token_id, *ids(tok, prompt)]
        assert target_text(tok, example) == output + tok.eos_token
        assert example.labels[: example.prompt_len - 1] == [IGNORE_INDEX] * (example.prompt_len - 1)
    # the input column may be absent altogether
    train, _ = load(tmp_path, tok, [{"instruction": "say hi", "output": "hi"}], format="alpaca")
    assert train[0].input_ids[: train[0].prompt_len] == [tok.bos_token_id, *ids(tok, prompts[1])]


def test_chat_without_a_template_gets_the_fallback_and_trains_on_assistant_turns(tmp_path, tok):
    assert not tok.chat_template
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    train, held_out = load(tmp_path, tok, path=path, eval_path=str(path), format="chat")
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE  # and so exported with the tokenizer
    rendered = "<s><|user|>\nreverse: abc\n<|assistant|>\ncba</s>\n<|user|>\ncopy: ab\n<|assistant|>\nab</s>\n"
    assert tok.apply_chat_template(CHAT, tokenize=False) == rendered
    assert train[0].input_ids == ids(tok, rendered)[:-1]
    assert target_text(tok, train[0]) == "cba</s>ab</s>"  # both assistant turns with their eos, nothing else
    example = held_out[0]  # evaluation: the prompt ends where the last assistant turn begins
    assert example.target == "ab"
    assert tok.decode(example.input_ids[: example.prompt_len]) == rendered[: rendered.rindex("ab</s>")]
    assert example.prompt == rendered[: rendered.rindex("ab</s>")]


def test_chat_train_on_prompt_trains_on_everything(tmp_path, tok):
    train, _ = load(tmp_path, tok, [{"messages": CHAT}], format="chat", train_on_prompt=True)
    assert train[0].labels == train[0].input_ids[1:] + [ids(tok, "\n")[0]]


def test_chat_uses_the_tokenizers_own_template(tmp_path, tok):
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                         "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                         "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    template = tok.chat_template
    train, _ = load(tmp_path, tok, [{"conversation": CHAT}], format="chat", messages_column="conversation")
    assert tok.chat_template == template
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert train[0].input_ids == ids(tok, rendered)[:-1]  # no bos/eos added: the template decides
    assert target_text(tok, train[0]) == "cba<|im_end|>ab<|im_end|>"  # the end-of-turn marker is a target


def test_chat_template_whose_renderings_are_not_prefixes(tmp_path, tok):
    # The message count up front changes with every prefix: the content is located instead.
    tok.chat_template = ("n={{ messages|length }}\n{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}")
    train, _ = load(tmp_path, tok, [{"messages": CHAT}], format="chat")
    assert target_text(tok, train[0]) == "cba</s>ab</s>"


def test_every_tokenisation_path_agrees(tmp_path, tok):
    """The Rust backend (default), __call__ with offsets, and piece by piece (slow tokenizers)."""
    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    batches = {"prompt_completion": {"prompt": ["copy: ab\n", "x"], "completion": ["ab", ""]},
               "chat": {"messages": [CHAT, CHAT[:2]]}, "text": {"text": ["abc", ""]}}
    for format, batch in batches.items():
        rendered = formats._render_rows(batch, config(tmp_path, "x", format=format), tok, "test", 0)
        fast = encoding._Encoder(tok)
        results = [fast(rendered)]
        fast.backend = None
        results.append(fast(rendered))
        fast.fast = False
        results.append(fast(rendered))
        assert [ids for ids, _ in results[0]] == [ids for ids, _ in results[2]] == \
            tok([r.text for r in rendered], add_special_tokens=False)["input_ids"]
        for result in results[1:]:
            trains = [encoding._in_spans(starts, r.spans) for r, (_, starts) in zip(rendered, result)]
            assert trains == [encoding._in_spans(starts, r.spans) for r, (_, starts) in zip(rendered, results[0])]


# --------------------------------------------------------------------------- sources


def test_sources_directory_parquet_csv_arrow_saved_dataset(tmp_path, tok):
    import datasets
    import pyarrow as pa

    rows = [{"prompt": f"copy: {w}\n", "completion": w} for w in ("ab", "cd", "ef", "gh")]
    reference, _ = load(tmp_path, tok, rows)
    expected = [reference[i].input_ids for i in range(4)]

    def loaded(path, **overrides):
        train, _ = load_splits(config(tmp_path, path, **overrides), tok, 256, 0)
        return [train[i].input_ids for i in range(len(train))]

    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    write_jsonl(folder / "a.jsonl", rows[:2])
    write_jsonl(folder / "sub" / "b.jsonl", rows[2:])
    (folder / ".hidden" / "junk.jsonl").write_text("not json\n")
    assert loaded(folder) == expected
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(tmp_path / "t.parquet")
    assert loaded(tmp_path / "t.parquet") == expected
    table.to_csv(tmp_path / "t.csv", index=False)
    assert loaded(tmp_path / "t.csv") == expected
    with pa.ipc.new_stream(str(tmp_path / "t.arrow"), table.data.schema) as writer:
        writer.write_table(table.data.table)
    assert loaded(tmp_path / "t.arrow") == expected
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(tmp_path / "saved")
    assert loaded(tmp_path / "saved") == expected
    train, held_out = load_splits(config(tmp_path, tmp_path / "saved", eval_split="test"), tok, 256, 0)
    assert len(train) == 4 and [ex.target for ex in held_out] == ["ab"]
    with pytest.raises(ValueError, match="no split 'dev'; splits found: train, test"):
        loaded(tmp_path / "saved", split="dev")


def test_eval_fraction_holds_rows_out_of_training(tmp_path, tok):
    rows = [{"prompt": f"copy: {a}{b}\n", "completion": a + b} for a in "abcdefgh" for b in "abcdefgh"]
    train, held_out = load(tmp_path, tok, rows, eval_fraction=0.25, max_eval_examples=5, seed=3)
    assert len(train) == 48 and len(held_out) == 5
    train_texts = {tok.decode(train[i].input_ids, skip_special_tokens=True) for i in range(len(train))}
    assert len(train_texts) == 48 and not {ex.prompt + ex.target for ex in held_out} & train_texts
    _, held_out = load(tmp_path, tok, rows, eval_fraction=0.05, max_eval_examples=100, seed=3)
    assert len(held_out) == 3  # only the held-out rows, however many max_eval_examples allows


# --------------------------------------------------------------------------- bad input


def test_malformed_json_line_names_file_line_and_start(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": oops}\n')
    with pytest.raises(ValueError) as err:
        load(tmp_path, tok, path=path)
    assert f"{path}:3: malformed JSON line" in str(err.value)
    assert '\'{"prompt": "c", "completion": oops}\'' in str(err.value)
    path.write_text('{"prompt": "a", "completion": "b"}\n["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected one JSON object per line, got list"):
        load(tmp_path, tok, path=path)
    doc = tmp_path / "bad.json"  # one multi-line JSON document
    doc.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c" "completion": "d"}\n]\n')
    with pytest.raises(ValueError, match=r"bad.json:3: malformed JSON"):
        load(tmp_path, tok, path=doc)


def test_missing_column_lists_the_columns_found(tmp_path, tok):
    with pytest.raises(ValueError) as err:
        load(tmp_path, tok, [{"prompt": "a", "answer": "b"}])
    message = str(err.value)
    assert "no column 'completion'" in message and "columns found: prompt, answer" in message
    assert "data.completion_column" in message


def test_null_value_names_the_row(tmp_path, tok):
    with pytest.raises(ValueError, match=r"row 2: column 'completion' is empty \(null\)"):
        load(tmp_path, tok, [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}])


def test_bad_chat_messages(tmp_path, tok):
    with pytest.raises(ValueError, match="row 1: expected a non-empty list of"):
        load(tmp_path, tok, [{"messages": "hello"}], format="chat")


@pytest.mark.parametrize("content,expected", [("", "no rows"), ("\n \n", "no rows"),
                                              ('{"prompt": "a", "completion": "b"}\n', None)])
def test_empty_file(tmp_path, tok, content, expected):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    if expected:
        with pytest.raises(ValueError, match=expected):
            load(tmp_path, tok, path=path)
    else:
        assert len(load(tmp_path, tok, path=path)[0]) == 1


def test_missing_path(tmp_path, tok):
    with pytest.raises(ValueError, match="data.path=.*nope.jsonl: no such file or directory"):
        load(tmp_path, tok, path=tmp_path / "nope.jsonl")


def test_overlong_truncated_or_dropped_and_counted(tmp_path, tok, caplog):
    rows = [{"prompt": "copy: ", "completion": "a" * n} for n in (2, 10, 30, 40)]  # 8+n+1 ids
    caplog.set_level(logging.WARNING, logger="launcher.data")
    train, _ = load(tmp_path, tok, rows, seq_len=24)
    assert (len(train), train.truncated, train.dropped) == (4, 2, 0)
    assert max(len(train[i].input_ids) for i in range(4)) == 24
    assert "2 of 4 training examples longer than trainer.seq_len=24: 2 truncated, 0 dropped" in caplog.text
    train, _ = load(tmp_path, tok, rows, seq_len=24, overlong="drop")
    assert (len(train), train.truncated, train.dropped) == (2, 0, 2)
    with pytest.raises(ValueError, match="no usable training examples: of 4 rows, 4 are longer than"):
        load(tmp_path, tok, rows, seq_len=8, overlong="drop")
    # truncation inside the prompt leaves no target: dropped, counted, and an error when nothing is left
    with pytest.raises(ValueError, match="4 have no target token left"):
        load(tmp_path, tok, rows, seq_len=4)


# --------------------------------------------------------------------------- packing


def demo_like_encoded(tmp_path, tok, n=40):
    rows, _ = make_splits(n_train=n, n_eval=1, seed=1)
    return data.encode_rows(data.load_rows(data.resolve_source(str(write_jsonl(tmp_path / "d.jsonl", rows)),
                                                                "data.path")),
                            config(tmp_path, "x"), tok, "test")


def test_pack_sequences_fills_bins_deterministically():
    sizes = np.random.default_rng(0).integers(1, 33, size=500)
    bins = pack_sequences(sizes, 32)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sizes[b].sum() <= 32 for b in bins)
    assert bins == pack_sequences(sizes, 32)
    assert sizes.sum() / (len(bins) * 32) > 0.9


def test_collate_packed_positions_and_documents():
    items = [PackedSequence([5, 6, 7, 8, 9], [6, 7, -100, 9, 3], [2, 3]), PackedSequence([1, 2], [2, 3], [2])]
    batch = collate(items, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    assert batch["document_ids"].tolist() == [[0, 0, 1, 1, 1], [0, 0, -1, -1, -1]]
    assert batch["labels"][1].tolist() == [2, 3, -100, -100, -100]
    assert set(collate([Example("", "", [1, 2], [2, 3], 1)], 0)) == {"input_ids", "labels"}


def test_packed_loss_and_gradients_equal_unpacked(tmp_path, tok):
    encoded = demo_like_encoded(tmp_path, tok)
    unpacked = TrainSet(encoded, 64, "truncate", False, "test")
    packed = TrainSet(encoded, 64, "truncate", True, "test")
    assert len(packed) < len(unpacked) // 2  # several documents per sequence
    assert sorted(len(packed[i].doc_lens) for i in range(len(packed)))[-1] >= 3
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    results = []
    for train_set in (unpacked, packed):
        copy_ = copy.deepcopy(model)
        loss_sum, n_targets = copy_(**collate([train_set[i] for i in range(len(train_set))], tok.pad_token_id))
        loss_sum.backward()
        results.append((loss_sum.detach(), n_targets, {n: p.grad for n, p in copy_.named_parameters()}))
    (loss_a, count_a, grads_a), (loss_b, count_b, grads_b) = results
    assert count_a == count_b == sum(unpacked[i].n_targets for i in range(len(unpacked)))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    # and without document_ids the packed batch would attend across documents: a different loss
    batch = collate([packed[i] for i in range(len(packed))], tok.pad_token_id)
    del batch["document_ids"]
    assert abs(copy.deepcopy(model)(**batch)[0].item() - loss_a.item()) > 1e-3


def test_demo_packing_efficiency(tmp_path, tok):
    train, _ = load_splits(config(tmp_path, name="demo", packing=True), tok, 128, 0)
    assert len(train) < 30000 // 4 and train.efficiency > 0.9
    assert "packed into" in train.describe()


# --------------------------------------------------------------------------- order


@pytest.mark.parametrize("num_sequences", [103, 64])
def test_global_batch_is_the_same_whatever_the_world_size(num_sequences):
    sampler = GlobalBatchSampler(num_sequences, 8, seed=5)
    for step in (0, 1, sampler.steps_per_epoch - 1, sampler.steps_per_epoch, 3 * sampler.steps_per_epoch + 2):
        expected = sampler.global_batch(step)
        assert len(set(expected)) == 8
        for world_size in (1, 2, 4):
            for micro in (1, 2):
                union = [i for rank in range(world_size)
                         for mb in GlobalBatchSampler(num_sequences, 8, seed=5).micro_batches(step, rank, world_size,
                                                                                             micro)
                         for i in mb]
                assert union == expected, (step, world_size, micro)
    epoch = [i for step in range(sampler.steps_per_epoch) for i in sampler.global_batch(step)]
    assert len(set(epoch)) == len(epoch)  # no sequence twice in an epoch


def test_packing_does_not_depend_on_world_size_or_run(tmp_path, tok):
    encoded = demo_like_encoded(tmp_path, tok)
    first = TrainSet(encoded, 64, "truncate", True, "test")
    again = TrainSet(copy.deepcopy(encoded), 64, "truncate", True, "test")
    assert [first[i] for i in range(len(first))] == [again[i] for i in range(len(again))]


def test_resume_mid_epoch_sees_the_uninterrupted_batches():
    straight = GlobalBatchSampler(50, 4, seed=1)
    expected = [straight.micro_batches(step, 1, 2, 1) for step in range(30)]  # crosses epoch boundaries
    for restart in (5, 12, 13):
        resumed = GlobalBatchSampler(50, 4, seed=1)  # a new process after the restart
        assert [resumed.micro_batches(step, 1, 2, 1) for step in range(restart, 30)] == expected[restart:]


# --------------------------------------------------------------------------- cache


def test_second_load_is_a_cache_hit(tmp_path, tok, monkeypatch):
    rows = [{"prompt": f"copy: {w}\n", "completion": w} for w in ("ab", "cd", "ef")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    first, held_first = load_splits(config(tmp_path, path, eval_path=str(path)), tok, 32, 0)
    calls = []
    original = encoding._Encoder.__call__
    monkeypatch.setattr(encoding._Encoder, "__call__",
                        lambda self, rendered: calls.append(1) or original(self, rendered))
    second, held_second = load_splits(config(tmp_path, path, eval_path=str(path)), tok, 32, 0)
    assert not calls
    assert [second[i] for i in range(3)] == [first[i] for i in range(3)] and held_second == held_first
    # seq_len, overlong and packing are applied after the cache: still a hit
    load_splits(config(tmp_path, path, eval_path=str(path), packing=True, overlong="drop"), tok, 16, 0)
    assert not calls
    # new contents, another format setting or another tokenizer: tokenised again
    write_jsonl(path, rows[:2])
    assert len(load_splits(config(tmp_path, path), tok, 32, 0)[0]) == 2 and calls
    calls.clear()
    load_splits(config(tmp_path, path, train_on_prompt=True), tok, 32, 0)
    assert calls
    calls.clear()
    other = load_tokenizer(None, None)
    other.add_tokens(["<extra>"])
    load_splits(config(tmp_path, path, train_on_prompt=True), other, 32, 0)
    assert calls


def test_processes_sharing_a_cache_tokenise_once(tmp_path, tok, monkeypatch):
    """Ranks started together (no process group yet) wait on the entry's lock; one of them builds it."""
    import multiprocessing
    import time

    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "copy: ab\n", "completion": "ab"}] * 4)
    builds = tmp_path / "builds"
    original = data._tokenize_splits

    def slow_counting_build(*args, **kwargs):
        with open(builds, "a") as f:
            f.write("x")
        time.sleep(0.3)
        return original(*args, **kwargs)

    def child():
        train, _ = load_splits(config(tmp_path, path), tok, 32, 0)
        raise SystemExit(0 if len(train) == 4 else 1)

    monkeypatch.setattr(data, "_tokenize_splits", slow_counting_build)
    processes = [multiprocessing.get_context("fork").Process(target=child) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    assert builds.read_text() == "x"


def test_unwritable_or_disabled_cache_still_loads(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    (tmp_path / "file").write_text("")
    train, _ = load_splits(DataConfig(name="t", path=str(path), cache_dir=str(tmp_path / "file" / "cache")), tok, 8, 0)
    assert len(train) == 1 and "cannot be created" in caplog.text
    train, _ = load_splits(config(tmp_path, path, cache=False), tok, 8, 0)
    assert len(train) == 1 and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- the demo


def test_shipped_demo_files_are_what_demo_task_generates():
    train, held_out = make_splits()
    for name, rows in (("train", train), ("eval", held_out)):
        shipped = [json.loads(line) for line in (DEMO_DIR / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == rows, name


def test_demo_goes_through_the_pipeline_with_evaluable_prompts(tmp_path, tok):
    train, held_out = load_splits(config(tmp_path, name="demo", max_eval_examples=256), tok, 32, 0)
    assert (len(train), len(held_out)) == (30000, 256)
    for example in held_out[:20]:
        assert tok.decode(example.input_ids[: example.prompt_len], skip_special_tokens=True) == example.prompt
        assert target_text(tok, example) == example.target + tok.eos_token


def test_train_runs_with_packing(tmp_path):
    from launcher.compose import compose_config, to_config
    from launcher.loop import train

    summary = train(to_config(compose_config([
        "trainer.max_steps=2", "data.packing=true", "data.max_eval_examples=8", "trainer.export_hf=false",
        "trainer.seq_len=64", f"data.cache_dir={tmp_path / 'cache'}"])), tmp_path / "run")
    assert summary["steps"] == 2 and summary["final_loss"] is not None
