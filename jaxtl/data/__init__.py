"""Images and datasets: decoding, preprocessing, class lists."""
