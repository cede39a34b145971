"""Assistant-only loss with every curated family's own chat template: the trained tokens of a
multi-turn conversation decode to exactly each assistant content and its end-of-turn token.

The templates are bundled copies (recipes/<model>/chat_template.jinja, tests/unit/data/templates/;
sources in tests/unit/data/templates/README.md); the tokenizers are tiny byte-level BPEs built here
with each family's special tokens, so nothing is downloaded.
"""

from __future__ import annotations

import pytest
from conftest import REPO

from finetune.data import templates
from finetune.data.masks import tokenize_sft
from finetune.data.rows import RowError, apply_system
from finetune.data.templates import assistant_spans, render, system_choice

HERE = REPO / "tests" / "unit" / "data" / "templates"
QWEN = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
THINK = ["<think>", "</think>"]  # added tokens, not special, as in the Qwen3/DeepSeek/GLM tokenizers
HARMONY = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|startoftext|>", "<|endoftext|>"]

# family: (template file, special tokens, plain added tokens, bos, eos, end of a middle turn, end of the last turn)
FAMILIES = {
    "mixtral": ("recipes/mixtral-8x7b/chat_template.jinja", ["<s>", "</s>"], [], "<s>", "</s>", "</s>", "</s>"),
    "qwen2_moe": (HERE / "qwen2_moe.jinja", QWEN, [], None, "<|im_end|>", "<|im_end|>", "<|im_end|>"),
    "qwen3_moe": ("recipes/qwen3-30b-a3b/chat_template.jinja", QWEN, THINK, None, "<|im_end|>", "<|im_end|>", "<|im_end|>"),
    "qwen3_5_moe": (HERE / "qwen3_5_moe.jinja", QWEN, THINK, None, "<|im_end|>", "<|im_end|>", "<|im_end|>"),
    # stand-in: Qwen3-Next's own (2507) template was not available offline; it is ChatML with the Qwen3 tokens
    "qwen3_next": ("recipes/qwen3-30b-a3b/chat_template.jinja", QWEN, THINK, None, "<|im_end|>", "<|im_end|>", "<|im_end|>"),
    "olmoe": ("recipes/olmoe-1b-7b/chat_template.jinja", ["<|endoftext|>", "<|padding|>"], [], None, "<|endoftext|>",
              "<|endoftext|>", "<|endoftext|>"),
    "deepseek_v3": (HERE / "deepseek_v3.jinja", ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"], ["<｜User｜>", "<｜Assistant｜>", *THINK],
                    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "gpt_oss": ("recipes/gpt-oss-20b/chat_template.jinja", HARMONY, [], "<|startoftext|>", "<|return|>", "<|end|>", "<|return|>"),
    # GLM ends a turn by starting the next (its generation config stops on <|user|>); nothing follows the last
    "glm4_moe": (HERE / "glm4_moe.jinja", ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                                           "<|endoftext|>"], THINK, None, "<|endoftext|>", "<|user|>", ""),
    "granitemoe": (HERE / "granitemoe.jinja", ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"], [],
                   "<|end_of_text|>", "<|end_of_text|>", "<|end_of_text|>", "<|end_of_text|>"),
    "phimoe": (HERE / "phimoe.jinja", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], [], None,
               "<|endoftext|>", "<|end|>", "<|end|>"),
    "llama4": (HERE / "llama4.jinja", ["<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|end_of_text|>"], [],
               "<|begin_of_text|>", "<|eot|>", "<|eot|>", "<|eot|>"),
    "gemma4": (HERE / "gemma4.jinja", ["<bos>", "<eos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"], [],
               "<bos>", "<eos>", "<turn|>", "<turn|>"),
}

SYSTEM = {"role": "system", "content": "Answer in one word."}
CHAT = [
    {"role": "user", "content": "reverse lamp"}, {"role": "assistant", "content": "pmal"},
    {"role": "user", "content": "and tiger, please"}, {"role": "assistant", "content": "regit"},
    {"role": "user", "content": "now both in capitals"}, {"role": "assistant", "content": "PMAL REGIT"},
]
ANSWERS = [m["content"] for m in CHAT if m["role"] == "assistant"]


def family_tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path, special, plain, bos, eos, _, _ = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([m["content"] for m in CHAT] * 4 + ["assistant user system model"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, clean_up_tokenization_spaces=False,
                                        chat_template=(REPO / path).read_text())
    tokenizer.add_tokens(plain)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special if t not in (bos, eos)]})
    return tokenizer


def trained_runs(tokenizer, messages) -> list[str]:
    """The trained tokens, decoded run by run (a run: consecutive trained tokens)."""
    enc = tokenize_sft(tokenizer, messages, assistant_only=True)
    runs, current = [], []
    for token, trained in zip(enc["input_ids"], enc["assistant_masks"]):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trained_tokens_are_the_answers_and_their_end_token(family):
    tokenizer = family_tokenizer(family)
    *_, middle, last = FAMILIES[family]
    how = system_choice(tokenizer, "auto")
    messages, action = apply_system([SYSTEM, *CHAT], how)
    assert action == ("kept" if how == "keep" else "folded")
    expected = [a + middle for a in ANSWERS[:-1]] + [ANSWERS[-1] + last]
    assert trained_runs(tokenizer, messages) == expected, render(tokenizer, messages)
    # the system prompt, the user turns and the template's own text around the answers are context
    full, spans = assistant_spans(tokenizer, messages)
    untrained = "".join(full[a:b] for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(full)]))
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in untrained


def test_qwen3_think_block_of_the_last_turn_is_context_not_trained():
    """Qwen3 writes `<think>\\n\\n</think>\\n\\n` into the last assistant turn only (not prefix-preserving)."""
    tokenizer = family_tokenizer("qwen3_moe")
    full, spans = assistant_spans(tokenizer, CHAT)
    assert full.count("<think>\n\n</think>\n\n") == 1
    think = full.index("<think>")
    assert full[spans[-1][0] - len("<think>\n\n</think>\n\n"):spans[-1][0]] == "<think>\n\n</think>\n\n"
    assert not any(a <= think < b for a, b in spans)
    assert [full[a:b] for a, b in spans] == ["pmal<|im_end|>", "regit<|im_end|>", "PMAL REGIT<|im_end|>"]


def test_harmony_channel_header_is_context_and_the_last_turn_ends_with_return():
    tokenizer = family_tokenizer("gpt_oss")
    full, spans = assistant_spans(tokenizer, [SYSTEM, *CHAT])
    assert [full[a:b] for a, b in spans] == ["pmal<|end|>", "regit<|end|>", "PMAL REGIT<|return|>"]
    assert all(full[:a].endswith("<|start|>assistant<|channel|>final<|message|>") for a, _ in spans)


def test_a_template_that_trims_content_is_located_by_the_text_between_turns():
    """Gemma 4 and GLM trim assistant content: answers with surrounding spaces are found all the same,
    and what is trained is what the template rendered."""
    for family, end in [("gemma4", "<turn|>"), ("glm4_moe", "<|user|>")]:
        tokenizer = family_tokenizer(family)
        chat = [dict(m) for m in CHAT]
        chat[1]["content"] = "  pmal \n"
        full, turns = render(tokenizer, chat), [1, 3, 5]
        assert templates._wrapped(tokenizer, chat, turns, full) is None  # the markers would keep the spaces
        assert [full[a:b] for a, b in templates._between(tokenizer, chat, turns, full)] == ANSWERS
        assert trained_runs(tokenizer, chat)[:2] == ["pmal" + end, "regit" + end]


def test_whitespace_a_template_keeps_stays_with_the_answer_and_the_end_token_after_it_is_trained():
    """Qwen3 strips only leading newlines of its last answer: the answer's own trailing spaces are
    rendered, so they are trained with it, and <|im_end|> after them still is."""
    tokenizer = family_tokenizer("qwen3_moe")
    chat = [dict(m) for m in CHAT]
    chat[-1]["content"] = "\n\nPMAL REGIT  "
    full, spans = assistant_spans(tokenizer, chat)
    assert [full[a:b] for a, b in spans][-1] == "PMAL REGIT  <|im_end|>"


def test_an_end_token_after_spaces_is_trained_with_them():
    """Llama-2's format puts a space between the answer and </s>; a newline would end the search."""
    tokenizer = family_tokenizer("mixtral")
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                               "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
    full, spans = assistant_spans(tokenizer, CHAT)
    assert [full[a:b] for a, b in spans] == ["pmal </s>", "regit </s>", "PMAL REGIT </s>"]
    tokenizer.chat_template = tokenizer.chat_template.replace("' ' + eos_token", "'\\n' + eos_token")
    full, spans = assistant_spans(tokenizer, CHAT)
    assert [full[a:b] for a, b in spans] == ANSWERS


def test_an_answer_equal_to_template_text_is_still_located_in_its_own_turn():
    tokenizer = family_tokenizer("qwen2_moe")
    chat = [{"role": "user", "content": "say assistant"}, {"role": "assistant", "content": "assistant"},
            {"role": "user", "content": "im_start"}, {"role": "assistant", "content": "<|im_start|>"}]
    full, spans = assistant_spans(tokenizer, chat)
    assert [full[a:b] for a, b in spans] == ["assistant<|im_end|>", "<|im_start|><|im_end|>"]
    assert full.index("<|im_start|>assistant\nassistant") + len("<|im_start|>assistant\n") == spans[0][0]


def test_a_turn_the_template_rewrites_is_a_row_error_not_a_guessed_mask():
    """Reasoning inside the content: Qwen3 moves it into a think block of the last turn; the turn cannot
    be located as given, and the row says so (data.bad_rows decides) instead of training a guess."""
    tokenizer = family_tokenizer("qwen3_moe")
    chat = [{"role": "user", "content": "reverse lamp"}, {"role": "assistant", "content": "<think>\nlamp backwards\n</think>\n\npmal"}]
    with pytest.raises(RowError, match=r"cannot locate the assistant turns \(messages\[1\]\).*data.assistant_only_loss: false"):
        assistant_spans(tokenizer, chat)


def test_marker_characters_in_a_row_are_refused():
    tokenizer = family_tokenizer("qwen2_moe")
    chat = [{"role": "user", "content": "hi \ue000"}, {"role": "assistant", "content": "ho"}]
    with pytest.raises(RowError, match="private-use characters"):
        assistant_spans(tokenizer, chat)


@pytest.mark.parametrize("family, expected", [("mixtral", "fold"), ("phimoe", "keep"), ("gpt_oss", "keep"), ("qwen3_moe", "keep")])
def test_auto_system_keeps_where_the_template_renders_a_system_turn(family, expected):
    assert system_choice(family_tokenizer(family), "auto") == expected


def test_system_choices_keep_fold_drop():
    chat = [SYSTEM, *CHAT[:2]]
    assert apply_system(chat, "keep") == (chat, "kept")
    assert apply_system(chat, "drop") == (CHAT[:2], "dropped")
    folded, action = apply_system(chat, "fold")
    assert action == "folded" and folded[0] == {"role": "user", "content": "Answer in one word.\n\nreverse lamp"}
    assert folded[1:] == CHAT[1:2] and apply_system(CHAT, "fold") == (CHAT, None)
