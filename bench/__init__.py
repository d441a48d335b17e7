"""`python -m bench` (or `make bench`): this project's runtime against openai-whisper and faster-whisper.

Same checkpoint, same audio, same decoding settings, same thread count; every transcription runs
in a fresh child process (bench/driver.py), interleaved over repetitions. See bench/cli.py.
"""
