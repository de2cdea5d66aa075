"""Factories shared by the tests (adapters, engines, the HF + PEFT oracle)."""
