"""A small word-level tokenizer for rlstack's synthetic tasks, built with `tokenizers`, saved in HF format.

Text is split into a few whole words (`\\boxed`, `Answer`, ...) and otherwise single characters, so any
arithmetic, equation or puzzle text round-trips exactly: `decode(encode(s)) == s` for every string made
of the characters below. Chat turns use role tokens (CHAT_TEMPLATE).
"""

from __future__ import annotations

import re
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
WORDS = (
    "\\boxed",
    "Answer",
    "answer",
    "Compute",
    "Solve",
    "Use",
    "numbers",
    "target",
    "make",
    "each",
    "once",
    "What",
    "is",
    "the",
    "for",
    "so",
    # tool calls (rlstack.envs.tool_calls): the fixed parts of a call as a few tokens, as BPE vocabularies
    # have them, so that a tool call costs ~20 tokens plus its code, not ~60
    "<tool_call>",
    "</tool_call>",
    '"name":',
    '"arguments":',
    '"code":',
    "python",
    "print",
)
CHARS = string.digits + string.ascii_letters + "+-*/=()[]{}<>^.,:;?!_\\'\"%$&|# \n`"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson(separators=(',', ':')) }}</tool_call>{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""Chat turns as role tokens; an assistant turn ends with EOS, after its tool calls written as
`<tool_call>{"name":...,"arguments":...}</tool_call>` (rlstack.envs.tool_calls); tool results are `tool`
turns. Tool schemas (`tools=`) are not rendered: the tiny model learns its tool from demonstrations."""


def vocabulary() -> list[str]:
    """Special tokens first (ids 0..3 are pad, bos, eos, unk), then roles, words, characters."""
    return [PAD, BOS, EOS, UNK, *ROLES, *WORDS, *CHARS]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Longest alternatives first so `\boxed` wins over `\`; every other character is its own piece.
    words = sorted(WORDS, key=len, reverse=True)
    pattern = "|".join(re.escape(w) for w in words) + r"|[\s\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, BOS, EOS, UNK, *ROLES])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLES),
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
