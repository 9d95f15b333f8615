"""One module per `qwen15` command: add_arguments(parser) and run(args)."""
