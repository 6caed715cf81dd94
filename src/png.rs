//! PNG encoding with tEXt metadata, so every image says how it was made.

use std::io::Cursor;

#[derive(Debug, thiserror::Error)]
pub enum PngError {
    #[error("cannot encode {0} channels as PNG (1 = gray, 3 = RGB)")]
    Channels(usize),
    #[error("pixel buffer holds {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("PNG encoder: {0}")]
    Encode(#[from] png::EncodingError),
}

/// How hard the PNG encoder's deflate works. Our images are the bottleneck's by-product, not an
/// archive: `fast` (fdeflate) is the default because it costs a fraction of zlib's time for
/// files a little larger (`bench encode` measures both; docs/perf.md has the numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PngCompression {
    /// fdeflate: one pass, Huffman plus short matches.
    #[default]
    Fast,
    /// zlib level 6.
    Default,
    /// zlib level 9 with per-row adaptive filtering: smallest files, slowest.
    Best,
}

impl PngCompression {
    pub const ALL: [PngCompression; 3] = [Self::Fast, Self::Default, Self::Best];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Default => "default",
            Self::Best => "best",
        }
    }
}

impl std::fmt::Display for PngCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Encodes planar (C, H, W) 8-bit pixels as a gray or RGB PNG with the given tEXt entries.
pub fn encode_png(
    planar: &[u8],
    channels: usize,
    height: usize,
    width: usize,
    text: &[(&str, String)],
    compression: PngCompression,
) -> Result<Vec<u8>, PngError> {
    let color = match channels {
        1 => png::ColorType::Grayscale,
        3 => png::ColorType::Rgb,
        c => return Err(PngError::Channels(c)),
    };
    let plane = height * width;
    if planar.len() != channels * plane {
        return Err(PngError::Size {
            got: planar.len(),
            expected: channels * plane,
        });
    }
    let mut interleaved = vec![0u8; planar.len()];
    for c in 0..channels {
        for p in 0..plane {
            interleaved[p * channels + c] = planar[c * plane + p];
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(Cursor::new(&mut out), width as u32, height as u32);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        match compression {
            PngCompression::Fast => enc.set_compression(png::Compression::Fast),
            PngCompression::Default => enc.set_compression(png::Compression::Default),
            PngCompression::Best => {
                enc.set_compression(png::Compression::Best);
                enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
            }
        }
        for (k, v) in text {
            enc.add_text_chunk(k.to_string(), v.clone())?;
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(&interleaved)?;
        writer.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_text() {
        let planar: Vec<u8> = (0..3 * 4 * 2).map(|i| i as u8 * 10).collect();
        let bytes = encode_png(
            &planar,
            3,
            4,
            2,
            &[("seed", "42".into())],
            PngCompression::Fast,
        )
        .unwrap();
        let dec = png::Decoder::new(Cursor::new(bytes));
        let mut reader = dec.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (2, 4));
        assert_eq!(info.uncompressed_latin1_text[0].keyword, "seed");
        assert_eq!(info.uncompressed_latin1_text[0].text, "42");
        let mut buf = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut buf).unwrap();
        // pixel (0,1): channel c at planar index c*8 + 1
        assert_eq!(&buf[3..6], &[10, 90, 170]);
    }

    #[test]
    fn rejects_bad_channel_count() {
        assert!(encode_png(&[0; 8], 2, 2, 2, &[], PngCompression::Fast).is_err());
    }
}
