"""The modes of `python bench.py` (the only entry point): models.py (teacher vs students), kernel_timing.py
(eager vs torch.compile vs Triton per kernel), peers.py (other Whisper engines), and common.py, what they share.
Nothing outside bench.py and this folder imports benchmark code."""
