"""The quickstart demo: `qwen15 demo` (see qwen15.demo.pipeline)."""
