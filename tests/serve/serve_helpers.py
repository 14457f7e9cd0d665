import io

from PIL import Image


def png_bytes(size=(32, 32), color=(0, 0, 0), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()
