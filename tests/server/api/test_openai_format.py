"""OpenAI's protocol beside its routes (server/api/openai_format.py), without a model: the four prompt forms and n,
what a chat becomes for each kind of task, and the completions log-probability layout with its text offsets."""

from __future__ import annotations

import pytest

from prompt_core.spec import INPUT_SLOT, PromptKind, PromptSpec
from server.api.errors import ApiError
from server.api.openai_format import BASE_PROMPT, LogprobListing, Served, chat_prompt, completion_inputs, usage
from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.engine.request import PromptRef, RequestOutput, TokenLogprob


class Tokenizer:
    chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"
    all_special_tokens = ["<|im_start|>", "<|endoftext|>"]

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}\n" for m in messages) + "<|im_start|>assistant\n"


class Engine:
    def token_strings(self, ids):
        return [f"<{i}>" for i in ids]


def served(kind=PromptKind.HARD, template=INPUT_SLOT) -> Served:
    spec = PromptSpec(kind, 0 if kind is PromptKind.HARD else 4, template)
    return Served(PromptRef(key="t@1", spec=spec), {})


def chat(*messages) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="t", messages=[{"role": r, "content": c} for r, c in messages])


@pytest.mark.parametrize("prompt, texts, ids", [
    ("a", ["a", "a"], [None, None]),
    (["a", "b"], ["a", "a", "b", "b"], [None] * 4),
    ([5, 6], ["", ""], [[5, 6], [5, 6]]),
    ([[5], [6, 7]], [""] * 4, [[5], [5], [6, 7], [6, 7]]),
])
def test_each_prompt_form_gives_n_choices_in_openais_order(prompt, texts, ids):
    assert completion_inputs(CompletionRequest(model="t", prompt=prompt, n=2)) == (texts, ids)


def test_too_many_choices_and_max_tokens_0_without_echo_are_422s():
    with pytest.raises(ApiError, match="40 prompts x n=2 make 80 choices"):
        completion_inputs(CompletionRequest(model="t", prompt=["x"] * 40, n=2))
    with pytest.raises(ApiError, match="allowed with echo"):
        completion_inputs(CompletionRequest(model="t", prompt="x", max_tokens=0))


def test_a_plain_hard_template_frames_the_last_message_in_the_models_chat_template():
    prompt, text = chat_prompt(Tokenizer(), served(template="Q: {input}"), chat(("system", "Be short"),
                                                                                 ("user", "hi")), "t")
    assert prompt is BASE_PROMPT
    assert text == "<|im_start|>system\nBe short\n<|im_start|>user\nQ: hi\n<|im_start|>assistant\n"
    with pytest.raises(ApiError, match="the last message must be the user's"):
        chat_prompt(Tokenizer(), served(), chat(("user", "hi"), ("assistant", "yo")), "t")


@pytest.mark.parametrize("task, why", [
    (served(PromptKind.PROMPT_TUNING), "its soft prompt was trained on its own input format"),
    (served(template="<|im_start|>user\n{input}"), "its template is already a chat prompt"),
])
def test_a_task_with_its_own_format_takes_one_user_message_as_its_input(task, why):
    assert chat_prompt(Tokenizer(), task, chat(("user", "hi")), "t") == (task.prompt, "hi")
    with pytest.raises(ApiError, match=why):
        chat_prompt(Tokenizer(), task, chat(("system", "s"), ("user", "hi")), "t")


def test_completion_logprobs_count_offsets_through_the_echo_and_list_the_chosen_token():
    prompt = [TokenLogprob(1, None, ()), TokenLogprob(2, -0.5, ((3, -0.1),))]
    generated = [TokenLogprob(4, -1.0, ((4, -1.0),))]
    listing = LogprobListing(Engine()).completion(prompt, 0, generated, 10)
    assert listing.tokens == ["<1>", "<2>", "<4>"] and listing.text_offset == [0, 3, 10]
    assert listing.top_logprobs == [None, {"<3>": -0.1, "<2>": -0.5}, {"<4>": -1.0}]
    chat_lps = LogprobListing(Engine()).chat(generated).content[0]
    assert (chat_lps.token, chat_lps.bytes, len(chat_lps.top_logprobs)) == ("<4>", list(b"<4>"), 1)


def test_a_prompts_tokens_count_once_however_many_choices():
    outs = [RequestOutput(f"r{i}", [], "", True, prompt_tokens=7, completion_tokens=i) for i in range(4)]
    assert usage(outs, n=2).model_dump() == {"prompt_tokens": 14, "completion_tokens": 6, "total_tokens": 20}
