"""`qwen15 chat --model DIR`: multi-turn chat in the terminal, replies streamed as they are generated.

Interactive by default (line editing and history through readline where available); `/clear` starts a new
conversation, `/exit` or end of input leaves; Ctrl-C stops a reply that is being generated. `--predict-data Q1 Q2 ...` answers the questions in order and exits
(no terminal needed); `--run-demo` asks the seed's three demo questions in one conversation.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from qwen15.commands.options import SAMPLING_HELP, add_model_arguments, add_sampling_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=512)
    g = parser.add_argument_group("conversation")
    g.add_argument(
        "--system-prompt",
        default=None,
        help='system message (default "You are a helpful assistant."; "" for none)',
    )
    g.add_argument(
        "--no-history",
        dest="history",
        action="store_false",
        help="answer each question alone (default: the conversation is carried into later turns)",
    )
    g.add_argument(
        "--context-window", type=int, help="tokens of conversation kept (default: the model's context window)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--predict-data", nargs="+", metavar="QUESTION", help="answer these questions in order, exit"
    )
    mode.add_argument(
        "--run-demo", action="store_true", help="ask the seed's three demo questions, then exit"
    )
    parser.epilog = SAMPLING_HELP + " In chat, replies always stop at <|im_end|> and <|endoftext|> as well."


def _session(args: argparse.Namespace, model, tokenizer):
    from qwen15.chat import ChatSession
    from qwen15.chat_template import DEFAULT_SYSTEM_PROMPT
    from qwen15.generation import chat_sampling_defaults, sampling_defaults
    from qwen15.sampling import SamplingParams

    base = sampling_defaults(getattr(model, "generation_config", None))
    if args.temperature is None:  # no generation_config.json: Qwen1.5-Chat's recommended values
        base = chat_sampling_defaults(getattr(model, "generation_config", None))
    temperature = 0.0 if args.greedy else args.temperature
    sampling = SamplingParams(
        temperature=base.temperature if temperature is None else temperature,
        top_k=base.top_k if args.top_k is None else args.top_k,
        top_p=base.top_p if args.top_p is None else args.top_p,
        repetition_penalty=base.repetition_penalty
        if args.repetition_penalty is None
        else args.repetition_penalty,
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


def run(args: argparse.Namespace) -> int:
    from qwen15.chat import DEMO_QUESTIONS
    from qwen15.commands.options import load_model
    from qwen15.errors import UserError

    model, tokenizer = load_model(args)
    session = _session(args, model, tokenizer)
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
        for q in questions:
            out.write(f"User: {q}\nAssistant: ")
            _answer(session, q, out)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print(
            "Chat with the model. /clear starts a new conversation, /exit (or Ctrl-D) leaves.",
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
        if question in ("/exit", "/quit"):
            return 0
        if question == "/clear":
            session.clear()
            print("[new conversation]", file=sys.stderr)
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
