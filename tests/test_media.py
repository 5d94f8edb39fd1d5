"""media.py: probe gives the size players show (a phone's portrait video is stored sideways)."""
import numpy as np

from heygem_watch.media import probe
from tests import mediagen


def test_probe_gives_the_size_players_show(tmp_path):
    stored = np.ascontiguousarray(np.rot90(mediagen.quadrants(), -1))  # 160 high, 96 wide as stored
    phone = mediagen.write_video(tmp_path / "phone.mp4", [stored] * 2, 25, display=(90, False))
    assert (probe(phone).width, probe(phone).height) == (160, 96)
    assert (probe(phone, shown_size=False).width, probe(phone, shown_size=False).height) == (96, 160)  # as stored
    plain = mediagen.write_video(tmp_path / "plain.mp4", [stored] * 2, 25)
    assert (probe(plain).width, probe(plain).height) == (96, 160)
