"""The ASR core shared by training, the CPU backend, the compiler and the emulator."""
