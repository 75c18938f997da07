"""A minimal ctypes binding of eSpeak NG for offline demo speech.

eSpeak NG is licensed GPL-3.0-or-later. It is loaded at run time from the optional
`espeakng-loader` wheel (the `demo` extra), which ships libespeak-ng and its voice data; d2v
neither links nor redistributes it, and nothing outside `d2v.data.demo` uses it.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: synthesize in the calling thread, hand samples to the callback
POS_CHARACTER = 1
CHARS_UTF8 = 1
PARAM_RATE, PARAM_PITCH = 1, 3  # espeak_PARAMETER: words per minute, base pitch 0-100

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """One initialized eSpeak NG library (its state is process-global: use one per process)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as err:
            raise ImportError("the audio demo needs eSpeak NG: pip install espeakng-loader") from err
        lib: Any = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                 espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak_Initialize failed")
        self._chunks: list[np.ndarray] = []

        def collect(wav: Any, count: int, events: Any) -> int:
            if count > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
            return 0  # 0 = go on synthesizing

        self._callback = _CALLBACK(collect)  # kept referenced: the library calls it later
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib

    def synthesize(self, text: str, *, voice: str, rate: int, pitch: int) -> np.ndarray:
        """float32 waveform in [-1, 1] at `self.sample_rate` (22,050 Hz)."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self._lib.espeak_SetParameter(PARAM_RATE, rate, 0)
        self._lib.espeak_SetParameter(PARAM_PITCH, pitch, 0)
        self._chunks.clear()
        data = text.encode("utf-8") + b"\0"
        if self._lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None) != 0:
            raise RuntimeError(f"espeak_Synth failed for {text!r}")
        wav = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return wav.astype(np.float32) / 32768.0
