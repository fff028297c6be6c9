"""`longtune chat MODEL_OR_RUN`: a terminal conversation with a trained model, replies streamed as they are
generated, in the template the run trained with. Reads stdin line by line, so it works piped as well as on a TTY.

Commands: `/reset` forgets the conversation so far, `/exit` (or end of input) quits.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from longtune.config import GenerationConfig, coerce_key, parse_override
from longtune.errors import ConfigError
from longtune.data.templates import TemplateOptions
from longtune.generation import ModelSource, generate_kwargs, load_generation_model, prompt_ids, resolve_model_source

RESET, EXIT = "/reset", "/exit"
# Keys `chat` reads from the run's train_config.yaml and from key=value overrides.
CHAT_KEYS = {f.name for f in dataclasses.fields(GenerationConfig)} | {
    "template", "default_system", "enable_thinking", "dtype", "bf16", "fp16", "trust_remote_code", "seed",
}


@dataclass(frozen=True)
class ChatSettings:
    generation: GenerationConfig
    template: str  # the `template` key (a name or auto)
    options: TemplateOptions  # the run's default_system / enable_thinking
    dtype: str
    trust_remote_code: bool
    seed: int


def chat_settings(run_config: dict[str, Any], overrides: list[str]) -> ChatSettings:
    """The run's own generation keys, template and dtype, then `key=value` overrides (generation keys, template,
    dtype); anything else is a one-line ConfigError."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value in run_config.items():
        if key in CHAT_KEYS and value is not None:
            values[key], sources[key] = value, "the run's train_config.yaml"
    for text in overrides:
        key, value = parse_override(text)
        if key not in CHAT_KEYS:
            coerce_key(key, value, "command line")  # an unknown key says so (with the closest one)
            raise ConfigError(f"chat: key '{key}' does not apply to chat; give generation keys "
                              "(do_sample, temperature, max_new_tokens, ...), template or dtype")
        values[key], sources[key] = value, "command line"
    typed = {key: coerce_key(key, value, sources[key]) for key, value in values.items()}
    generation_keys = {f.name for f in dataclasses.fields(GenerationConfig)}
    try:
        generation = GenerationConfig(**{k: v for k, v in typed.items() if k in generation_keys})
    except ConfigError as exc:
        raise ConfigError(f"chat: {exc}") from None
    dtype = typed.get("dtype", "auto")
    if dtype == "auto":
        dtype = "bfloat16" if typed.get("bf16") else "float16" if typed.get("fp16") else "float32"
    options = TemplateOptions(default_system=typed.get("default_system"),
                              enable_thinking=typed.get("enable_thinking", True))
    return ChatSettings(generation, typed.get("template", "auto"), options, dtype, typed.get("trust_remote_code", False),
                        typed.get("seed", 42))


class _StreamTo(TextStreamer):
    """Writes the reply to `out` as it is generated (TextStreamer prints to sys.stdout)."""

    def __init__(self, tokenizer: Any, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        self.out.flush()


class ChatSession:
    """A conversation with one model: `reply` streams the answer to a message and keeps both in the history."""

    def __init__(self, source: ModelSource, settings: ChatSettings, system: str | None = None):
        from longtune.data.templates import check_template_name
        from longtune.models.loader import DTYPES

        self.settings = settings
        self.model, self.tokenizer = load_generation_model(source, DTYPES[settings.dtype], settings.trust_remote_code)
        check_template_name(settings.template)
        self.system = system
        self.history: list[dict[str, str]] = []
        torch.manual_seed(settings.seed)

    def reset(self) -> None:
        self.history = []

    @torch.no_grad()
    def reply(self, message: str, out: TextIO) -> str:
        messages = [*self.history, {"role": "user", "content": message}]
        ids = prompt_ids(self.tokenizer, self.settings.template, messages, self.system, self.settings.options)
        kwargs = generate_kwargs(self.settings.generation, self.tokenizer, self.model, self.settings.template)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        # HF streams only one hypothesis at a time: beam search prints its reply once it is chosen
        streamer = _StreamTo(self.tokenizer, out) if self.settings.generation.num_beams == 1 else None
        generated = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        streamer=streamer, **kwargs)
        text = self.tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True)
        if streamer is None:
            out.write(text)
        self.history = [*messages, {"role": "assistant", "content": text}]
        return text


def run_chat(source: str, overrides: list[str], system: str | None = None, message: str | None = None,
             stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """The `longtune chat` loop: one reply to `message`, or a conversation over the lines of `stdin`."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    adapter = next((parse_override(o)[1] for o in overrides if o.startswith("adapter_name_or_path=")), None)
    model_source = resolve_model_source(source, None if adapter is None else str(adapter))
    settings = chat_settings(model_source.run_config, [o for o in overrides
                                                       if not o.startswith("adapter_name_or_path=")])
    session = ChatSession(model_source, settings, system)
    if message is not None:
        stdout.write("Assistant: ")
        session.reply(message, stdout)
        stdout.write("\n")
        return 0
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"chat with {source}: {RESET} clears the history, {EXIT} (or Ctrl-D) quits\n")
    while True:
        if interactive:
            stdout.write("User: ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if text.strip() == EXIT:
            break
        if text.strip() == RESET:
            session.reset()
            stdout.write("History has been removed.\n")
            continue
        if not text.strip():
            continue
        stdout.write("Assistant: ")
        session.reply(text, stdout)
        stdout.write("\n")
        stdout.flush()
    return 0
