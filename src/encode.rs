//! Image files in the format a client asks for, each carrying the generation metadata in that
//! format's own place: PNG tEXt chunks, a JPEG COM segment, a WebP XMP chunk. Whoever holds the
//! file can tell how to make it again.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder};

use crate::png::{encode_png, PngCompression, PngError};

/// `output_format`, as OpenAI's Images API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub const ALL: [OutputFormat; 3] = [Self::Png, Self::Jpeg, Self::Webp];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    /// The format named by a media type of an `Accept` header entry, if any.
    pub fn from_mime(mime: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.mime() == mime)
    }
}

impl std::str::FromStr for OutputFormat {
    type Err = ();

    /// `jpg` is accepted for `jpeg`, as people type it.
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "jpg" => Ok(Self::Jpeg),
            _ => Self::ALL.into_iter().find(|f| f.as_str() == s).ok_or(()),
        }
    }
}

impl std::fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// JPEG quality when a request gives no `output_compression`: OpenAI's default is 100, which
/// for our small images costs little and keeps JPEG closest to the PNG.
pub const DEFAULT_QUALITY: u8 = 100;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Png(#[from] PngError),
    #[error("cannot encode {0} channels (1 = gray, 3 = RGB)")]
    Channels(usize),
    #[error("pixel buffer holds {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("{format} encoder: {message}")]
    Encoder {
        format: OutputFormat,
        message: String,
    },
    #[error("metadata of {0} bytes does not fit a JPEG comment (at most 65533)")]
    CommentTooLong(usize),
}

/// How to write one image: the format and its knobs (the request picks the format and JPEG
/// quality, the server the PNG deflate effort).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    pub format: OutputFormat,
    /// JPEG quality, 1–100 (PNG and WebP are lossless here: the image crate's WebP encoder is
    /// lossless only).
    pub quality: u8,
    pub png: PngCompression,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            format: OutputFormat::Png,
            quality: DEFAULT_QUALITY,
            png: PngCompression::default(),
        }
    }
}

/// Encodes planar (C, H, W) 8-bit pixels as `options` say.
pub fn encode(
    planar: &[u8],
    channels: usize,
    height: usize,
    width: usize,
    text: &[(&str, String)],
    options: EncodeOptions,
) -> Result<Vec<u8>, EncodeError> {
    let EncodeOptions {
        format,
        quality,
        png,
    } = options;
    let (w, h) = (width as u32, height as u32);
    let failed = |e: image::ImageError| EncodeError::Encoder {
        format,
        message: e.to_string(),
    };
    let mut out = Vec::new();
    match format {
        OutputFormat::Png => Ok(encode_png(planar, channels, height, width, text, png)?),
        OutputFormat::Jpeg => {
            let (pixels, color) = interleaved(planar, channels, height * width)?;
            JpegEncoder::new_with_quality(Cursor::new(&mut out), quality.clamp(1, 100))
                .write_image(&pixels, w, h, color)
                .map_err(failed)?;
            insert_jpeg_comment(&out, &comment_text(text))
        }
        OutputFormat::Webp => {
            let (pixels, color) = interleaved(planar, channels, height * width)?;
            WebPEncoder::new_lossless(Cursor::new(&mut out))
                .write_image(&pixels, w, h, color)
                .map_err(failed)?;
            add_webp_xmp(&out, &xmp_packet(text), w, h)
                .map_err(|message| EncodeError::Encoder { format, message })
        }
    }
}

/// Interleaved pixels and their colour type (the image crate's encoders take HWC).
fn interleaved(
    planar: &[u8],
    channels: usize,
    plane: usize,
) -> Result<(Vec<u8>, ExtendedColorType), EncodeError> {
    let color = match channels {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        c => return Err(EncodeError::Channels(c)),
    };
    Ok((interleave(planar, channels, plane)?, color))
}

fn interleave(planar: &[u8], channels: usize, plane: usize) -> Result<Vec<u8>, EncodeError> {
    if planar.len() != channels * plane {
        return Err(EncodeError::Size {
            got: planar.len(),
            expected: channels * plane,
        });
    }
    let mut out = vec![0u8; planar.len()];
    for c in 0..channels {
        for p in 0..plane {
            out[p * channels + c] = planar[c * plane + p];
        }
    }
    Ok(out)
}

/// `key: value` lines, the same entries as the PNG's tEXt chunks.
pub fn comment_text(text: &[(&str, String)]) -> String {
    text.iter()
        .map(|(k, v)| format!("{k}: {}", v.replace(['\n', '\r'], " ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Puts a COM segment after SOI and the JFIF APP0 segment (which readers expect first).
fn insert_jpeg_comment(jpeg: &[u8], comment: &str) -> Result<Vec<u8>, EncodeError> {
    let body = comment.as_bytes();
    if body.len() > 65533 {
        return Err(EncodeError::CommentTooLong(body.len()));
    }
    let mut at = 2; // after SOI
    if jpeg.len() >= 6 && jpeg[2] == 0xFF && jpeg[3] == 0xE0 {
        at = 4 + u16::from_be_bytes([jpeg[4], jpeg[5]]) as usize;
    }
    let at = at.min(jpeg.len());
    let mut out = Vec::with_capacity(jpeg.len() + body.len() + 4);
    out.extend_from_slice(&jpeg[..at]);
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&jpeg[at..]);
    Ok(out)
}

/// The XMP namespace of our properties; a name, never fetched.
pub const XMP_NAMESPACE: &str = "urn:diffit-server:generation:1";

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An XMP packet with one `diffit:<key>` attribute per entry.
pub fn xmp_packet(text: &[(&str, String)]) -> String {
    let attrs: String = text
        .iter()
        .map(|(k, v)| format!("\n   diffit:{k}=\"{}\"", xml_escape(v)))
        .collect();
    format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n\
         <x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n \
         <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n  \
         <rdf:Description rdf:about=\"\" xmlns:diffit=\"{XMP_NAMESPACE}\"{attrs}/>\n \
         </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end=\"w\"?>"
    )
}

fn chunk(fourcc: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(payload.len() + 9);
    c.extend_from_slice(fourcc);
    c.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    c.extend_from_slice(payload);
    if payload.len() % 2 == 1 {
        c.push(0);
    }
    c
}

/// Rewrites a simple WebP (`RIFF…WEBP` + one `VP8L`/`VP8 ` chunk) as an extended one: a `VP8X`
/// header whose XMP flag is set, the image chunk, then an `XMP ` chunk, as the container spec
/// orders them.
fn add_webp_xmp(webp: &[u8], xmp: &str, width: u32, height: u32) -> Result<Vec<u8>, String> {
    if webp.len() < 20 || &webp[..4] != b"RIFF" || &webp[8..12] != b"WEBP" {
        return Err("the encoder did not write a RIFF WEBP file".into());
    }
    let image = &webp[12..];
    let fourcc = &image[..4];
    if fourcc != b"VP8L" && fourcc != b"VP8 " {
        return Err(format!(
            "expected a simple WebP, found a '{}' chunk",
            String::from_utf8_lossy(fourcc)
        ));
    }
    const XMP_FLAG: u8 = 0x04;
    let mut vp8x = vec![XMP_FLAG, 0, 0, 0];
    vp8x.extend_from_slice(&width.saturating_sub(1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&height.saturating_sub(1).to_le_bytes()[..3]);
    let mut body = b"WEBP".to_vec();
    body.extend(chunk(b"VP8X", &vp8x));
    body.extend_from_slice(image);
    body.extend(chunk(b"XMP ", xmp.as_bytes()));
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend(body);
    Ok(out)
}

/// Reading the metadata back, for tests and tools: the JPEG comment, the WebP XMP packet.
pub mod read {
    /// The first COM segment's text.
    pub fn jpeg_comment(jpeg: &[u8]) -> Option<String> {
        let mut at = 2;
        while at + 4 <= jpeg.len() && jpeg[at] == 0xFF {
            let marker = jpeg[at + 1];
            let len = u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize;
            let body = jpeg.get(at + 4..at + 2 + len)?;
            if marker == 0xFE {
                return Some(String::from_utf8_lossy(body).into_owned());
            }
            if marker == 0xDA {
                return None; // image data starts: no comment before it
            }
            at += 2 + len;
        }
        None
    }

    /// The payload of the `XMP ` chunk.
    pub fn webp_xmp(webp: &[u8]) -> Option<String> {
        let mut at = 12;
        while at + 8 <= webp.len() {
            let size = u32::from_le_bytes(webp[at + 4..at + 8].try_into().ok()?) as usize;
            let payload = webp.get(at + 8..at + 8 + size)?;
            if &webp[at..at + 4] == b"XMP " {
                return Some(String::from_utf8_lossy(payload).into_owned());
            }
            at += 8 + size + size % 2;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(channels: usize, side: usize) -> Vec<u8> {
        (0..channels * side * side)
            .map(|i| (i * 7 % 256) as u8)
            .collect()
    }

    fn opts(format: OutputFormat, quality: u8) -> EncodeOptions {
        EncodeOptions {
            format,
            quality,
            ..Default::default()
        }
    }

    fn meta() -> Vec<(&'static str, String)> {
        vec![
            ("seed", "9007199254740993".into()),
            ("class_name", "T-shirt/top & \"tee\"".into()),
        ]
    }

    #[test]
    fn every_format_decodes_with_its_metadata() {
        for channels in [1, 3] {
            let px = gradient(channels, 16);
            for format in OutputFormat::ALL {
                let bytes = encode(&px, channels, 16, 16, &meta(), opts(format, 90)).unwrap();
                let found = match format {
                    // PNG: decoded and its tEXt read in png.rs's tests and over HTTP.
                    OutputFormat::Png => {
                        assert_eq!(&bytes[1..4], b"PNG");
                        continue;
                    }
                    OutputFormat::Jpeg => read::jpeg_comment(&bytes).unwrap(),
                    OutputFormat::Webp => read::webp_xmp(&bytes).unwrap(),
                };
                let img = image::load_from_memory(&bytes)
                    .unwrap_or_else(|e| panic!("{format} {channels}: {e}"));
                assert_eq!((img.width(), img.height()), (16, 16));
                if format == OutputFormat::Jpeg {
                    // (WebP's lossless format has no gray mode: gray decodes as RGB.)
                    assert_eq!(img.color().channel_count() as usize, channels);
                }
                assert!(found.contains("9007199254740993"), "{format}: {found}");
                assert!(found.contains("T-shirt/top"), "{format}: {found}");
            }
        }
    }

    #[test]
    fn every_png_compression_is_lossless_and_best_is_smallest() {
        // Smooth with a little texture, like a generated image: deflate has something to find.
        let side = 64;
        let px: Vec<u8> = (0..3 * side * side)
            .map(|i| {
                let (c, y, x) = (i / (side * side), (i / side) % side, i % side);
                ((x * 3 + y * 2 + c * 40 + (i * 31 % 7)) % 256) as u8
            })
            .collect();
        let mut sizes = Vec::new();
        for png in PngCompression::ALL {
            let options = EncodeOptions {
                png,
                ..Default::default()
            };
            let bytes = encode(&px, 3, side, side, &meta(), options).unwrap();
            let mut reader = ::png::Decoder::new(Cursor::new(&bytes))
                .read_info()
                .unwrap();
            let mut rgb = vec![0; reader.output_buffer_size()];
            reader.next_frame(&mut rgb).unwrap();
            assert_eq!(rgb, interleave(&px, 3, side * side).unwrap(), "{png}");
            sizes.push((png, bytes.len()));
        }
        let size = |level| sizes.iter().find(|(p, _)| *p == level).unwrap().1;
        assert!(
            size(PngCompression::Best) <= size(PngCompression::Fast),
            "{sizes:?}"
        );
    }

    #[test]
    fn webp_is_lossless_and_xmp_is_escaped() {
        let px = gradient(3, 8);
        let bytes = encode(&px, 3, 8, 8, &meta(), opts(OutputFormat::Webp, 100)).unwrap();
        let rgb = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(rgb.as_raw(), &interleave(&px, 3, 64).unwrap());
        let xmp = read::webp_xmp(&bytes).unwrap();
        assert!(xmp.contains("diffit:class_name=\"T-shirt/top &amp; &quot;tee&quot;\""));
    }

    #[test]
    fn format_names_and_bad_input() {
        assert_eq!("jpg".parse(), Ok(OutputFormat::Jpeg));
        assert_eq!("webp".parse(), Ok(OutputFormat::Webp));
        assert!("gif".parse::<OutputFormat>().is_err());
        assert_eq!(
            OutputFormat::from_mime("image/webp"),
            Some(OutputFormat::Webp)
        );
        assert!(encode(&[0; 8], 2, 2, 2, &[], opts(OutputFormat::Jpeg, 90)).is_err());
        assert!(encode(&[0; 5], 1, 2, 2, &[], opts(OutputFormat::Webp, 90)).is_err());
    }
}
