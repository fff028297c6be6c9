"""Chat templates selected by the `template` key: LLaMA-Factory's named templates as data, and `auto` (the
tokenizer's own jinja chat_template, rendered by encode.py).

A named template is a table of slots (user, assistant, system, function call, observation, prefix) plus its
default system prompt, stop words, eos handling, thinking and tool format, with LLaMA-Factory 0.9.5's names and
semantics. Encoding follows LLaMA-Factory token for token: each turn's slot pieces are tokenized separately and
concatenated, which is what makes our ids equal to its ids (tests/test_lf_templates.py checks it on fixtures made
by its own code). See docs/templates.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

from longtune.errors import ConfigError, DataError


class Special(NamedTuple):
    """A slot piece that is one token id rather than text: the tokenizer's bos or eos, or a named token."""

    kind: str  # "bos", "eos" or "token"
    token: str = ""


BOS, EOS = Special("bos"), Special("eos")
Piece = str | Special
Slot = tuple[Piece, ...]
CONTENT = "{{content}}"

# ChatML as a jinja chat_template (Qwen2's layout, no default system): the builtin tokenizer ships it
# (scripts/train_builtin_tokenizer.py), so `template: auto` on builtin:tiny renders what `chatml` encodes.
CHATML_JINJA = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# ---------------------------------------------------------------- tool formats


class FunctionCall(NamedTuple):
    name: str
    arguments: Any  # the decoded JSON arguments


_DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n'
    "```\n"
)
_GLM4_TOOL_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)
_LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tool_text}"
)
_QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _function_of(tool: dict) -> dict:
    """The function description of an OpenAI-style tool ({"type": "function", "function": {...}}) or a bare one."""
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _as_openai_tool(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _default_tool_prompt(tools: list[dict], today: str) -> str:
    text, names = "", []
    for tool in map(_function_of, tools):
        params = ""
        for name, param in tool["parameters"]["properties"].items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = f", should be one of [{', '.join(param['enum'])}]" if param.get("enum") else ""
            items = f", where each item should be {param['items'].get('type', '')}" if param.get("items") else ""
            params += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{params}\n"
        names.append(tool["name"])
    return _DEFAULT_TOOL_PROMPT.format(tool_text=text, tool_names=", ".join(names))


def _glm4_tool_prompt(tools: list[dict], today: str) -> str:
    text = "".join(
        f"\n\n## {tool['name']}\n\n{_dumps(tool, indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
        for tool in map(_function_of, tools)
    )
    return _GLM4_TOOL_PROMPT.format(tool_text=text)


def _llama3_tool_prompt(tools: list[dict], today: str) -> str:
    text = "".join(_dumps(_as_openai_tool(tool), indent=4) + "\n\n" for tool in tools)
    return _LLAMA3_TOOL_PROMPT.format(date=today, tool_text=text)


def _mistral_tool_prompt(tools: list[dict], today: str) -> str:
    return "[AVAILABLE_TOOLS] " + _dumps([_as_openai_tool(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"


def _qwen_tool_prompt(tools: list[dict], today: str) -> str:
    return _QWEN_TOOL_PROMPT.format(tool_text="".join("\n" + _dumps(_as_openai_tool(tool)) for tool in tools))


def _default_calls(calls: list[FunctionCall]) -> str:
    return "\n".join(f"Action: {c.name}\nAction Input: {_dumps(c.arguments)}" for c in calls)


def _glm4_calls(calls: list[FunctionCall]) -> str:
    if len(calls) > 1:
        raise ValueError("GLM-4 does not support parallel function calls")
    return f"{calls[0].name}\n{_dumps(calls[0].arguments)}"


def _llama3_calls(calls: list[FunctionCall]) -> str:
    objects = [{"name": c.name, "parameters": c.arguments} for c in calls]
    return _dumps(objects[0] if len(objects) == 1 else objects)


def _mistral_calls(calls: list[FunctionCall]) -> str:
    return _dumps([{"name": c.name, "arguments": c.arguments} for c in calls])


def _qwen_calls(calls: list[FunctionCall]) -> str:
    return "\n".join(f"<tool_call>\n{_dumps({'name': c.name, 'arguments': c.arguments})}\n</tool_call>" for c in calls)


class ToolFormat(NamedTuple):
    """How a model family is told its tools (appended to the system prompt) and how its calls are written."""

    tool_prompt: Callable[[list[dict], str], str]  # (tools, today's date) -> text
    function_calls: Callable[[list[FunctionCall]], str]


TOOL_FORMATS: dict[str, ToolFormat] = {
    "default": ToolFormat(_default_tool_prompt, _default_calls),
    "glm4": ToolFormat(_glm4_tool_prompt, _glm4_calls),
    "llama3": ToolFormat(_llama3_tool_prompt, _llama3_calls),
    "mistral": ToolFormat(_mistral_tool_prompt, _mistral_calls),
    "qwen": ToolFormat(_qwen_tool_prompt, _qwen_calls),
}

# ---------------------------------------------------------------- the templates


@dataclass(frozen=True)
class ChatTemplate:
    """One named template: LLaMA-Factory's slots and flags (its `register_template` arguments)."""

    name: str
    user: Slot
    assistant: Slot
    system: Slot
    function: Slot
    observation: Slot
    prefix: Slot = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False  # turns end with no eos token; one eos ends the whole sequence
    replace_eos: bool = False  # the tokenizer's eos becomes stop_words[0]
    tool_format: str = "default"
    reasoning: bool = False  # LLaMA-Factory's ReasoningTemplate: an empty thought is added where none is given
    system_in_first_user: bool = False  # LLaMA-Factory's Llama2Template: the system text opens the first user turn
    enable_thinking: bool = True
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")


def _template(
    name: str,
    *,
    user: Slot = (CONTENT,),
    assistant: Slot | None = None,
    system: Slot = (CONTENT,),
    function: Slot | None = None,
    observation: Slot | None = None,
    efficient_eos: bool = False,
    **flags: Any,
) -> ChatTemplate:
    """A template with LLaMA-Factory's defaults for the slots not given (its register_template)."""
    assistant = assistant or ((CONTENT,) if efficient_eos else (CONTENT, EOS))
    return ChatTemplate(
        name=name, user=user, assistant=assistant, system=system, function=function or assistant,
        observation=observation or user, efficient_eos=efficient_eos, **flags,
    )


_CHATML_USER = ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)
_CHATML_ASSISTANT = ("{{content}}<|im_end|>\n",)
_CHATML_SYSTEM = ("<|im_start|>system\n{{content}}<|im_end|>\n",)
_QWEN_OBSERVATION = (
    "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
)
_QWEN = dict(
    user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM, observation=_QWEN_OBSERVATION,
    tool_format="qwen", stop_words=("<|im_end|>",), replace_eos=True,
)
_GEMMA = dict(
    user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    assistant=("{{content}}<end_of_turn>\n",),
    system=("{{content}}\n\n",),
    observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    prefix=(BOS,), stop_words=("<end_of_turn>",), replace_eos=True, system_in_first_user=True,
)
_LLAMA3_USER = (
    "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
)
_DEEPSEEK3_USER = ("<｜User｜>{{content}}<｜Assistant｜>",)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        _template(
            "chatml", user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM,
            observation=("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
            stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True,
        ),
        _template("deepseek", user=("User: {{content}}\n\nAssistant:",), system=("{{content}}\n\n",), prefix=(BOS,)),
        _template("deepseek3", user=_DEEPSEEK3_USER, prefix=(BOS,)),
        _template("deepseekr1", user=_DEEPSEEK3_USER, prefix=(BOS,), reasoning=True),
        _template(
            "default", user=("Human: {{content}}", EOS, "\nAssistant:"), assistant=(CONTENT, EOS, "\n"),
            system=("System: {{content}}", EOS, "\n"),
        ),
        _template("empty", assistant=(CONTENT,)),
        _template("gemma", **_GEMMA),
        _template("gemma3", **_GEMMA),
        _template(
            "glm4", user=("<|user|>\n{{content}}<|assistant|>",), assistant=("\n{{content}}",),
            system=("<|system|>\n{{content}}",), function=(CONTENT,),
            observation=("<|observation|>\n{{content}}<|assistant|>",), prefix=("[gMASK]<sop>",),
            tool_format="glm4", stop_words=("<|user|>", "<|observation|>"), efficient_eos=True,
        ),
        _template(
            "llama2", user=(BOS, "[INST] {{content}} [/INST]"), system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
            system_in_first_user=True,
        ),
        _template(
            "llama3", user=_LLAMA3_USER, assistant=("{{content}}<|eot_id|>",),
            system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
            observation=(
                "<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            prefix=(BOS,), tool_format="llama3", stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True,
        ),
        _template(
            "mistral", user=("[INST] {{content}}[/INST]",), assistant=(" {{content}}", EOS),
            system=("{{content}}\n\n",), function=("[TOOL_CALLS] {{content}}", EOS),
            observation=('[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',), prefix=(BOS,),
            tool_format="mistral", system_in_first_user=True,
        ),
        _template(
            "phi", user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",), assistant=("{{content}}<|end|>\n",),
            system=("<|system|>\n{{content}}<|end|>\n",), stop_words=("<|end|>",), replace_eos=True,
        ),
        _template(
            "phi4", user=("<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",),
            assistant=("{{content}}<|im_end|>",), system=("<|im_start|>system<|im_sep|>{{content}}<|im_end|>",),
            stop_words=("<|im_end|>",), replace_eos=True,
        ),
        _template("qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                  **_QWEN),
        _template("qwen2_vl", default_system="You are a helpful assistant.", **_QWEN),
        _template("qwen3", reasoning=True, **_QWEN),
        _template("qwen3_nothink", **_QWEN),
        _template(
            "yi", user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM,
            stop_words=("<|im_end|>",),
        ),
    )
}

TEMPLATE_NAMES: tuple[str, ...] = ("auto", *sorted(TEMPLATES))


def check_template_name(name: str) -> None:
    """ConfigError unless `name` is auto or a named template (the config checks it before anything loads)."""
    if name not in TEMPLATE_NAMES:
        raise ConfigError(f"template: unknown template '{name}'; expected one of {', '.join(TEMPLATE_NAMES)}")


def check_tool_format(name: str | None) -> None:
    if name is not None and name not in TOOL_FORMATS:
        raise ConfigError(f"tool_format: unknown tool format '{name}'; expected one of {', '.join(TOOL_FORMATS)}")


@dataclass(frozen=True)
class TemplateOptions:
    """The data keys that adjust a named template (LLaMA-Factory's DataArguments of the same names)."""

    mask_history: bool = False  # train only the last assistant turn
    default_system: str | None = None  # replaces the template's default system prompt
    enable_thinking: bool = True  # reasoning templates: an added empty thought is trained (True) or prompt (False)
    tool_format: str | None = None  # replaces the template's tool format (and its function-call slot, as LF does)
    today: str | None = None  # the date the llama3 tool prompt states ("%d %b %Y"); None: today


def named_template(name: str, options: TemplateOptions = TemplateOptions()) -> ChatTemplate:
    """The template `name` with the option keys applied, as LLaMA-Factory's get_template_and_fix_tokenizer does."""
    check_template_name(name)
    if name == "auto":
        raise ValueError("template 'auto' is the tokenizer's jinja chat_template, not a named template")
    template = TEMPLATES[name]
    if options.tool_format is not None:
        check_tool_format(options.tool_format)
        # LF replaces the function slot by the plain default one, not by the template's assistant slot
        slot = (CONTENT,) if template.efficient_eos else (CONTENT, EOS)
        template = replace(template, tool_format=options.tool_format, function=slot)
    if options.default_system is not None:
        template = replace(template, default_system=options.default_system)
    if template.reasoning:
        template = replace(template, enable_thinking=options.enable_thinking)
    return template


def eos_token_of(template: ChatTemplate, tokenizer) -> str:
    """The eos token a run with this template uses: stop_words[0] when the template replaces eos (LF's
    fix_special_tokens), else the tokenizer's, else <|endoftext|>."""
    if template.replace_eos:
        return template.stop_words[0]
    return tokenizer.eos_token if tokenizer.eos_token_id is not None else "<|endoftext|>"


def text_eos_id(template: str, tokenizer) -> int | None:
    """The eos that ends a pretraining text: the tokenizer's for `auto`; as LF's pretrain processor for a named
    template, the run's eos (stop_words[0] where the template replaces it), <|end_of_text|> for llama3."""
    if template == "auto":
        return tokenizer.eos_token_id
    token = "<|end_of_text|>" if template == "llama3" else eos_token_of(TEMPLATES[template], tokenizer)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return tokenizer.eos_token_id
    return token_id


def stop_token_ids(template: str | ChatTemplate, tokenizer) -> list[int]:
    """Ids that end a generated reply: the eos in use and every stop word (`auto`: the tokenizer's eos)."""
    if template == "auto":
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if isinstance(template, str):
        template = named_template(template)
    ids = {tokenizer.convert_tokens_to_ids(eos_token_of(template, tokenizer))}
    ids.update(tokenizer.convert_tokens_to_ids(word) for word in template.stop_words)
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------- rendering turns into pieces

# roles of the messages a named template renders (LF's Role): user/observation prompt, assistant/function reply
PROMPT_ROLES, REPLY_ROLES = ("user", "observation"), ("assistant", "function")


def _fill(slot: Slot, content: str) -> list[Piece]:
    return [p.replace(CONTENT, content, 1) if isinstance(p, str) else p for p in slot]


def parse_function_calls(content: str) -> list[FunctionCall]:
    """The calls of a function_call turn: a JSON object or list of objects with `name` and `arguments`."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError:
        raise DataError(f"a function_call turn must be JSON with 'name' and 'arguments', got {content[:60]!r}") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and "name" in c and "arguments" in c for c in calls):
        raise DataError(f"a function_call turn must be JSON with 'name' and 'arguments', got {content[:60]!r}")
    return [FunctionCall(c["name"], c["arguments"]) for c in calls]


def _function_text(template: ChatTemplate, content: str) -> str:
    """A function_call turn as the model writes it: LF's FunctionFormatter (a thought or text around a
    `<tool_call>` wrapper is kept before the formatted calls; Llama2-style templates look for neither)."""
    calls_of = TOOL_FORMATS[template.tool_format].function_calls
    if template.system_in_first_user:
        return calls_of(parse_function_calls(content))
    open_call, close_call = template.tool_call_words
    wrapped = re.search(f"{re.escape(open_call)}(.*?){re.escape(close_call)}", content, re.DOTALL)
    if wrapped is not None:
        return content.replace(wrapped.group(0), "") + calls_of(parse_function_calls(wrapped.group(1)))
    open_thought, close_thought = template.thought_words
    thought = re.search(f"{re.escape(open_thought)}(.*?){re.escape(close_thought)}", content, re.DOTALL)
    if thought is None:
        return calls_of(parse_function_calls(content))
    return thought.group(0) + calls_of(parse_function_calls(content.replace(thought.group(0), "")))


def tool_prompt(template: ChatTemplate, tools: list[dict], today: str | None = None) -> str:
    if not tools:
        return ""
    return TOOL_FORMATS[template.tool_format].tool_prompt(tools, today or datetime.now().strftime("%d %b %Y"))


def turn_pieces(
    template: ChatTemplate, messages: Sequence[tuple[str, str]], system: str | None, tools: list[dict] | None,
    today: str | None = None,
) -> list[list[Piece]]:
    """The slot pieces of every message (role, content); the first also carries the prefix and system turn.

    As LF: the system prompt is the given one, else the template's default; a system turn is written when either
    it or a tool list (even an empty one) exists; tools are described at the end of the system text.
    """
    system = system or template.default_system
    out = []
    for i, (role, content) in enumerate(messages):
        pieces: list[Piece] = []
        system_text = ""
        if i == 0:
            pieces += template.prefix
            if system or tools is not None:
                text = system + tool_prompt(template, tools or [], today)
                if template.system_in_first_user:
                    system_text = _fill(template.system, text)[0]
                else:
                    pieces += _fill(template.system, text)
        if role == "user":
            pieces += _fill(template.user, system_text + content)
        elif role == "assistant":
            pieces += _fill(template.assistant, content)
        elif role == "observation":
            pieces += _fill(template.observation, content)
        elif role == "function":
            pieces += _fill(template.function, _function_text(template, content))
        else:
            raise ValueError(f"unexpected role {role!r}")
        out.append(pieces)
    return out


class PieceTokenizer:
    """Token ids of slot pieces, each text piece tokenized alone (as LF does); texts are tokenized in batches."""

    def __init__(self, tokenizer, template: ChatTemplate):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        eos = eos_token_of(template, tokenizer)
        self.eos = tokenizer.convert_tokens_to_ids(eos)
        if self.eos is None or (self.eos == tokenizer.unk_token_id and eos != tokenizer.unk_token):
            self.eos = tokenizer.eos_token_id
        self.thought_ids: list[int] | None = None
        self._ids: dict[str, list[int]] = {}
        if template.reasoning:
            self.thought_ids = self.text_ids(["".join(template.thought_words)])[0]

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._ids))
        if missing:
            encoded = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            self._ids.update(zip(missing, map(list, encoded), strict=True))
        return [self._ids[t] for t in texts]

    def prepare(self, pieces: list[list[Piece]]) -> None:
        """Tokenize every text piece of these turns in one call (later `ids` calls look them up)."""
        self.text_ids([p for turn in pieces for p in turn if isinstance(p, str) and p])

    def clear(self) -> None:
        self._ids.clear()

    def ids(self, turn: list[Piece]) -> list[int]:
        out: list[int] = []
        for piece in turn:
            if isinstance(piece, str):
                if piece:
                    out += self.text_ids([piece])[0]
            elif piece.kind == "bos":
                out += [self.bos] if self.bos is not None else []
            elif piece.kind == "eos":
                out += [self.eos] if self.eos is not None else []
            else:
                out.append(self.tokenizer.convert_tokens_to_ids(piece.token))
        return out


def remove_thought(template: ChatTemplate, content: str) -> str:
    open_thought, close_thought = template.thought_words
    pattern = re.compile(f"{re.escape(open_thought)}(.*?){re.escape(close_thought)}", re.DOTALL)
    return re.sub(pattern, "", content).lstrip("\n")


def _has_thought(template: ChatTemplate, content: str) -> bool:
    return any(word.strip() in content for word in template.thought_words)


class TurnPair(NamedTuple):
    prompt: list[int]
    reply: list[int]


def thinking_messages(
    template: ChatTemplate, messages: list[tuple[str, str]], *, one_turn: bool, mask_history: bool
) -> list[tuple[str, str]]:
    """The messages with the thoughts a reasoning template drops: history thoughts (one-turn encoding, or
    mask_history), every thought with enable_thinking off (LF's ReasoningTemplate)."""
    if not template.reasoning:
        return messages
    out = list(messages)
    last = len(out) - 1
    for i in range(1, len(out), 2):
        role, content = out[i]
        history = i < last
        if (not template.enable_thinking) or (history and (one_turn or mask_history)):
            out[i] = (role, remove_thought(template, content))
    return out


def encode_turn_pairs(
    template: ChatTemplate, pieces: PieceTokenizer, messages: list[tuple[str, str]], system: str | None,
    tools: list[dict] | None, *, mask_history: bool = False, today: str | None = None,
) -> list[TurnPair]:
    """(prompt ids, reply ids) of every exchange, as LF's encode_multiturn (thinking handled as it does)."""
    messages = thinking_messages(template, messages, one_turn=False, mask_history=mask_history)
    turns = turn_pieces(template, messages, system, tools, today)
    pieces.prepare(turns)
    encoded = [pieces.ids(turn) for turn in turns]
    pairs = [TurnPair(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]
    if template.reasoning:
        # an empty thought before a reply that has none: trained with thinking on, prompt with it off
        thinking_turns = [len(pairs) - 1] if mask_history else range(len(pairs))
        for t in thinking_turns:
            if not _has_thought(template, messages[2 * t + 1][1]):
                assert pieces.thought_ids is not None
                if template.enable_thinking:
                    pairs[t] = TurnPair(pairs[t].prompt, pieces.thought_ids + pairs[t].reply)
                else:
                    pairs[t] = TurnPair(pairs[t].prompt + pieces.thought_ids, pairs[t].reply)
    return pairs


def encode_one_turn(
    template: ChatTemplate, pieces: PieceTokenizer, messages: list[tuple[str, str]], system: str | None,
    tools: list[dict] | None, *, today: str | None = None,
) -> TurnPair:
    """(every turn before the last, the last reply) as LF's encode_oneturn (dpo, kto, rm rows)."""
    messages = thinking_messages(template, messages, one_turn=True, mask_history=False)
    turns = turn_pieces(template, messages, system, tools, today)
    pieces.prepare(turns)
    encoded = [pieces.ids(turn) for turn in turns]
    prompt, reply = [t for turn in encoded[:-1] for t in turn], encoded[-1]
    if template.reasoning and not _has_thought(template, messages[-1][1]):
        assert pieces.thought_ids is not None
        if template.enable_thinking:
            reply = pieces.thought_ids + reply
        else:
            prompt = prompt + pieces.thought_ids
    if template.efficient_eos:
        reply = reply + [pieces.eos]
    return TurnPair(prompt, reply)


def supervised_ids_and_labels(
    pairs: list[TurnPair], eos_id: int | None, *, efficient_eos: bool, train_on_prompt: bool, mask_history: bool,
    ignore_index: int = -100,
) -> tuple[list[int], list[int], int]:
    """(ids, unshifted labels, start of the last reply) of an sft conversation, as LF's supervised processor
    assembles them for a row that fits: replies trained (only the last with mask_history), prompts not (all
    with train_on_prompt); with efficient_eos the first prompt token of each later turn is trained (it ends the
    reply before it) and one eos closes the row."""
    ids: list[int] = []
    labels: list[int] = []
    last = len(pairs) - 1
    for i, (prompt, reply) in enumerate(pairs):
        # LF walks the turns last-first with mask_history: its "first turn" is then the last one
        first = (i == last) if mask_history else (i == 0)
        if train_on_prompt:
            prompt_labels = list(prompt)
        elif efficient_eos and not first and prompt:
            # LF labels this position with eos; we train the token that is really there (the next turn's
            # marker, a stop word of these templates), as every label here equals its input id (docs/templates.md)
            prompt_labels = [prompt[0]] + [ignore_index] * (len(prompt) - 1)
        else:
            prompt_labels = [ignore_index] * len(prompt)
        trained = not mask_history or i == last
        if i == last:
            response_start = len(ids) + len(prompt)
        ids += prompt + reply
        labels += prompt_labels + (list(reply) if trained else [ignore_index] * len(reply))
    if efficient_eos:
        ids.append(eos_id)
        labels.append(eos_id)
    return ids, labels, response_start


def render_generation_prompt(
    template: str, tokenizer, messages: list[dict[str, str]], tools: list[dict] | None = None,
    system: str | None = None, options: TemplateOptions = TemplateOptions(),
) -> list[int]:
    """Ids of a prompt for generation: `messages` (OpenAI-style dicts with roles user, assistant, tool or
    function, ending with a user or tool turn; a leading system message is taken as `system`) followed by the
    assistant header, with the empty thought a reasoning template puts there when thinking is off.

    `template: auto` renders the tokenizer's own chat_template with add_generation_prompt.
    """
    msgs = list(messages)
    if msgs and msgs[0]["role"] == "system":
        system = msgs[0]["content"] if system is None else system
        msgs = msgs[1:]
    if template == "auto":
        head = [{"role": "system", "content": system}] if system is not None else []
        return list(tokenizer.apply_chat_template(head + msgs, tools=tools, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    chat = named_template(template, options)
    roles = {"user": "user", "tool": "observation", "observation": "observation", "assistant": "assistant",
             "function": "function"}
    pairs = [(roles[m["role"]], m["content"]) for m in msgs] + [("assistant", "")]
    pieces = PieceTokenizer(tokenizer, chat)
    prompt, _ = encode_one_turn(chat, pieces, pairs, system, tools, today=options.today)
    return prompt


def resolve_chat_template(template: str, tokenizer) -> str | None:
    """The jinja chat template for `template: auto` (the tokenizer's own); None for a named template, which is
    encoded from its slots instead (encode_turn_pairs, encode_one_turn)."""
    check_template_name(template)
    if template != "auto":
        return None
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # tokenizers may ship several named templates; "default" is the chat one
        own = own.get("default")
    if not own:
        raise ConfigError(
            "template: 'auto' needs a tokenizer with a chat_template, and this one has none; "
            "set a named template, e.g. template: chatml (or qwen, llama3, mistral, gemma, default)"
        )
    return own


def template_options_of(cfg) -> TemplateOptions:
    """The template keys of a Config's data group."""
    d = cfg.data
    return TemplateOptions(mask_history=d.mask_history, default_system=d.default_system,
                           enable_thinking=d.enable_thinking, tool_format=d.tool_format)


def check_template_options(template: str, options: TemplateOptions, *, train_on_prompt: bool) -> None:
    """The checks a load needs before any row is read: a known template and tool format, and no train_on_prompt
    with an efficient-eos template (LF refuses it: the eos of a reply is labelled on the next prompt's token)."""
    check_template_name(template)
    check_tool_format(options.tool_format)
    if template != "auto" and train_on_prompt and TEMPLATES[template].efficient_eos:
        raise ConfigError(f"train_on_prompt: template '{template}' ends turns without an eos token "
                          f"(efficient_eos), so it cannot train on prompts; set train_on_prompt: false")
