"""An OpenAI-compatible routing proxy for validating speculative decoding on real traffic."""
