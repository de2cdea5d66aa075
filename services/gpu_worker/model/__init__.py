"""Model code for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flattened token batch."""
