"""What every Wav2Lip-format model expects, shared by the engine, the exporter and the precision converters
(kept here so that export.py and precision.py need not import each other).

Inputs: audio (B, 1, MEL_BANDS, MEL_STEP) mel window; face (B, 6, FACE_SIZE, FACE_SIZE) BGR/255, the first three
channels with their lower half masked. Output: (B, 3, FACE_SIZE, FACE_SIZE) BGR in [0, 1].
"""
FACE_SIZE = 96  # pixels, square crop the weights were trained on
MEL_BANDS = 80
MEL_STEP = 16  # mel columns per video frame window (0.2 s at 80 columns/s)
BOX_PADS = (0, 10, 0, 0)  # (top, bottom, left, right) pixels added to the detector box
BOX_SMOOTH = 5  # frames in the mean filter over box corners
