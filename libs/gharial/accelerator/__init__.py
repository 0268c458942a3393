"""The accelerator card: its instruction set, programs, compiler, emulator arithmetic and timing model."""
