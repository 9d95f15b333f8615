"""`qwen15 chat --model DIR`: multi-turn chat in the terminal, replies streamed as they are generated.

Interactive by default (line editing and history through readline where available); `/clear` starts a new
conversation, `/help` lists the commands, `/exit` or end of input leaves; Ctrl-C stops a reply that is being
generated. `--predict-data Q1 Q2 ...` answers the questions in order and exits (no terminal needed; a question
that cannot be answered is reported and the others still are, exit 2); `--run-demo` asks the seed's three demo
questions in one conversation.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from qwen15.commands.options import (
    SAMPLING_HELP,
    add_draft_arguments,
    add_model_arguments,
    add_sampling_arguments,
    bounded,
    sampling_overrides,
    utf8_text,
)

COMMANDS = {
    "/clear": "start a new conversation (the system prompt stays)",
    "/help": "this list",
    "/exit": "leave (also /quit, or end of input: Ctrl-D)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=512)
    add_draft_arguments(parser)
    g = parser.add_argument_group("conversation")
    g.add_argument(
        "--system-prompt",
        default=None,
        type=utf8_text("--system-prompt"),
        help='system message (default "You are a helpful assistant."; "" for none)',
    )
    g.add_argument(
        "--no-history",
        dest="history",
        action="store_false",
        help="answer each question alone (default: the conversation is carried into later turns)",
    )
    g.add_argument(
        "--context-window",
        type=bounded(int, 1),
        help="tokens of conversation kept (default and maximum: the model's context window)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--predict-data",
        nargs="+",
        metavar="QUESTION",
        type=utf8_text("--predict-data"),
        help="answer these questions in order, exit",
    )
    mode.add_argument(
        "--run-demo", action="store_true", help="ask the seed's three demo questions, then exit"
    )
    parser.epilog = SAMPLING_HELP + " In chat, replies always stop at <|im_end|> and <|endoftext|> as well."


def _session(args: argparse.Namespace, model, tokenizer, draft=None):
    from qwen15.chat import ChatSession
    from qwen15.chat_template import DEFAULT_SYSTEM_PROMPT
    from qwen15.generation import chat_sampling_defaults
    from qwen15.sampling import SamplingParams

    base = chat_sampling_defaults(getattr(model, "generation_config", None))
    given = sampling_overrides(args)
    sampling = SamplingParams(
        **{k: getattr(base, k) if given[k] is None else given[k] for k in given},
    )
    system = DEFAULT_SYSTEM_PROMPT if args.system_prompt is None else (args.system_prompt or None)
    return ChatSession(
        model,
        tokenizer,
        system_prompt=system,
        history=args.history,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        context_window=args.context_window,
        seed=args.seed,
        stop_token_ids=args.stop_token_id,
        draft=draft,
        draft_tokens=args.draft_tokens,
    )


def _answer(session, question: str, out) -> None:
    dropped = session.dropped_turns
    for delta in session.ask(question):
        out.write(delta)
        out.flush()
    out.write("\n")
    out.flush()
    if session.dropped_turns > dropped:
        print(
            f"[{session.dropped_turns - dropped} oldest exchange(s) dropped to fit the context window]",
            file=sys.stderr,
        )
    done = session.last_completion
    if session.draft is not None and done is not None:
        print(f"[draft tokens accepted {done.accepted}/{done.proposed}]", file=sys.stderr)


def _answer_all(session, questions: list[str], out) -> int:
    """--predict-data / --run-demo: every question in order; one that cannot be answered is reported (on stderr,
    naming it) and the rest are still answered. Exit 2 when any was refused."""
    from qwen15.errors import UserError

    refused = 0
    for i, q in enumerate(questions, 1):
        if not q.strip():
            print(f"qwen15 chat: error: --predict-data question {i} is empty; skipped", file=sys.stderr)
            refused += 1
            continue
        out.write(f"User: {q}\nAssistant: ")
        try:
            _answer(session, q, out)
        except UserError as e:
            out.write("\n")
            print(f"qwen15 chat: error: question {i}: {e}", file=sys.stderr)
            refused += 1
    if refused:
        print(f"qwen15 chat: {refused} of {len(questions)} question(s) not answered", file=sys.stderr)
    return 2 if refused else 0


def _slash_command(session, line: str) -> bool | None:
    """Handle a `/word` line: True to go on, False to leave; None when the line is not a command (text for the
    model, e.g. a path such as '/usr/bin is what?')."""
    word = line.split()[0]
    if len(line.split()) > 1 or not word[1:].isalpha():
        return None
    if word in ("/exit", "/quit"):
        return False
    if word == "/clear":
        session.clear()
        print("[new conversation]", file=sys.stderr)
    elif word == "/help":
        for name, text in COMMANDS.items():
            print(f"  {name:8} {text}", file=sys.stderr)
    else:
        print(f"[unknown command {word}; /help lists the commands]", file=sys.stderr)
    return True


def run(args: argparse.Namespace) -> int:
    from qwen15.chat import DEMO_QUESTIONS
    from qwen15.commands.options import load_draft, load_model
    from qwen15.errors import UserError

    sampling_overrides(args)  # contradictions are refused before the model loads
    model, tokenizer = load_model(args)
    draft = load_draft(args, model, tokenizer)
    limit = model.config.max_position_embeddings
    if args.context_window is not None and args.context_window > limit:
        raise UserError(
            f"--context-window {args.context_window}: the model's context is {limit} tokens at most"
        )
    session = _session(args, model, tokenizer, draft)
    if args.max_new_tokens > session.window:
        print(
            f"note: --max-new-tokens {args.max_new_tokens} is more than the context window ({session.window} "
            "tokens); each reply gets the room the conversation leaves",
            file=sys.stderr,
        )
    out = sys.stdout
    questions = list(DEMO_QUESTIONS) if args.run_demo else args.predict_data
    if questions is None:
        from qwen15.commands.options import tensor_parallel_world

        if tensor_parallel_world() > 1:
            raise UserError(
                "under torchrun (tensor parallel) chat answers --predict-data or --run-demo questions; the "
                "interactive mode reads the terminal, which only one process has"
            )
    if questions is not None:
        return _answer_all(session, questions, out)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print(
            "Chat with the model. /clear starts a new conversation, /help lists the commands, /exit (or Ctrl-D) "
            "leaves.",
            file=sys.stderr,
        )
    while True:
        try:
            line = input("User: " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        question = line.strip()
        if not question:
            continue
        if question.startswith("/"):
            go_on = _slash_command(session, question)
            if go_on is False:
                return 0
            if go_on:
                continue
        out.write("Assistant: ")
        try:
            _answer(session, question, out)
        except UserError as e:  # e.g. a question longer than the window: say so and keep the session
            out.write("\n")
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C stops this reply (it is not kept in the history), not the chat
            out.write("\n")
            print("[reply interrupted]", file=sys.stderr)
