//! The models one server serves, each under its own name: from `--model` (repeatable,
//! `NAME=PATH[,vae=PATH][,dtype=…][,steps=…]…` or a bare `PATH`), from a model file
//! (`--models models.toml` or `.json`), or, with neither, the embedded default model.
//! Everything here is checked before any weights are read: a bad entry ends start-up with a
//! message naming the model and the key.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::ValueEnum;
use serde::Deserialize;

use crate::config::{default_weights_dir, resolve_model_paths, Precision};
use crate::config::{DEFAULT_MODEL_FILE, DEFAULT_VAE_FILE};
use crate::diffusion::{GuidanceSchedule, SamplerKind};
use crate::pipeline::SamplingDefaults;

/// A model path that means the embedded default model (and, without `vae=`, its VAE).
pub const EMBEDDED: &str = "embedded";

/// Longest model name: it appears in URLs, metric labels and log lines.
pub const MAX_NAME_LEN: usize = 64;

/// The keys a `--model` entry (and a model file's entry, besides `name` and `path`) takes.
pub const KEYS: [&str; 7] = [
    "vae",
    "vae_config",
    "dtype",
    "steps",
    "sampler",
    "guidance_scale",
    "guidance_schedule",
];

/// Sampling defaults an operator sets for one model, over those its checkpoint carries.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DefaultsOverride {
    pub steps: Option<usize>,
    pub sampler: Option<SamplerKind>,
    pub guidance_scale: Option<f32>,
    pub guidance_schedule: Option<GuidanceSchedule>,
}

impl DefaultsOverride {
    /// `base` with the fields this sets replaced, checked as the checkpoint's own are.
    pub fn apply(&self, base: SamplingDefaults) -> anyhow::Result<SamplingDefaults> {
        let d = SamplingDefaults {
            steps: self.steps.unwrap_or(base.steps),
            sampler: self.sampler.unwrap_or(base.sampler),
            guidance_scale: self.guidance_scale.unwrap_or(base.guidance_scale),
            guidance_schedule: self.guidance_schedule.unwrap_or(base.guidance_schedule),
        };
        d.validate()?;
        Ok(d)
    }
}

/// One served model, resolved: its name (the `model` id in the API), files and settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    pub name: String,
    pub model: PathBuf,
    pub vae: PathBuf,
    pub vae_config: Option<PathBuf>,
    pub dtype: Precision,
    pub defaults: DefaultsOverride,
}

/// What an entry leaves out comes from these (`--vae`, `--vae-config`, `--dtype`).
#[derive(Debug, Clone, Default)]
pub struct Globals {
    pub vae: Option<PathBuf>,
    pub vae_config: Option<PathBuf>,
    pub dtype: Option<Precision>,
}

/// An entry as written, before names and paths are resolved.
#[derive(Debug, Clone, Default, PartialEq)]
struct RawEntry {
    name: Option<String>,
    path: PathBuf,
    vae: Option<PathBuf>,
    vae_config: Option<PathBuf>,
    dtype: Option<Precision>,
    defaults: DefaultsOverride,
}

impl RawEntry {
    /// Sets `key` (one of [`KEYS`]) from its text.
    fn set(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        let v = value.trim();
        anyhow::ensure!(!v.is_empty(), "{key} is empty");
        match key {
            "vae" => self.vae = Some(v.into()),
            "vae_config" => self.vae_config = Some(v.into()),
            "dtype" => {
                self.dtype = Some(Precision::from_str(v, true).map_err(|_| {
                    let names: Vec<String> = Precision::value_variants()
                        .iter()
                        .filter_map(|p| Some(p.to_possible_value()?.get_name().to_string()))
                        .collect();
                    anyhow::anyhow!("dtype must be one of {}; got '{v}'", names.join(", "))
                })?)
            }
            "steps" => {
                self.defaults.steps = Some(
                    v.parse()
                        .map_err(|_| anyhow::anyhow!("steps must be a whole number, got '{v}'"))?,
                )
            }
            "sampler" => {
                self.defaults.sampler = Some(v.parse().map_err(|_| {
                    anyhow::anyhow!("sampler must be one of ddpm, ddim, dpm-solver++; got '{v}'")
                })?)
            }
            "guidance_scale" => {
                self.defaults.guidance_scale = Some(
                    v.parse()
                        .ok()
                        .filter(|g: &f32| g.is_finite())
                        .ok_or_else(|| {
                            anyhow::anyhow!("guidance_scale must be a number, got '{v}'")
                        })?,
                )
            }
            "guidance_schedule" => {
                self.defaults.guidance_schedule =
                    Some(v.parse().map_err(|e: String| anyhow::anyhow!(e))?)
            }
            other => anyhow::bail!("unknown key '{other}'; the keys are {}", KEYS.join(", ")),
        }
        Ok(())
    }
}

/// Parses one `--model` value: `NAME=PATH[,key=value]…`, or `PATH[,key=value]…` (named after
/// the file). Paths cannot contain commas here; a model file takes any path.
fn parse_flag(text: &str) -> anyhow::Result<RawEntry> {
    let mut items = text.split(',');
    let head = items.next().unwrap_or("").trim();
    anyhow::ensure!(!head.is_empty(), "empty --model value");
    let mut raw = RawEntry::default();
    match head.split_once('=') {
        Some((name, path)) => {
            raw.name = Some(name.trim().to_string());
            raw.path = PathBuf::from(path.trim());
        }
        None => raw.path = PathBuf::from(head),
    }
    anyhow::ensure!(!raw.path.as_os_str().is_empty(), "no path after '='");
    for item in items {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("'{item}' is not key=value"))?;
        raw.set(key.trim(), value)?;
    }
    Ok(raw)
}

/// A model file: `[[models]]` tables (TOML) or `{"models": [{…}]}` (JSON), each with `name`,
/// `path` and any of [`KEYS`]. Relative paths are relative to the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsFile {
    models: Vec<FileEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    path: PathBuf,
    vae: Option<PathBuf>,
    vae_config: Option<PathBuf>,
    dtype: Option<String>,
    steps: Option<usize>,
    sampler: Option<String>,
    guidance_scale: Option<f32>,
    guidance_schedule: Option<String>,
}

fn read_file(path: &Path) -> anyhow::Result<Vec<RawEntry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the model file {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let file: ModelsFile = match ext.to_ascii_lowercase().as_str() {
        "toml" => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}", e.message()))?,
        "json" => serde_json::from_str(&text)?,
        _ => anyhow::bail!("a model file must end in .toml or .json"),
    };
    anyhow::ensure!(!file.models.is_empty(), "it lists no models");
    let dir = path.parent().unwrap_or(Path::new("."));
    let rel = |p: PathBuf| {
        if p.is_relative() && p != Path::new(EMBEDDED) {
            dir.join(p)
        } else {
            p
        }
    };
    file.models
        .into_iter()
        .map(|e| {
            let mut raw = RawEntry {
                name: Some(e.name.clone()),
                path: rel(e.path),
                vae: e.vae.map(rel),
                vae_config: e.vae_config.map(rel),
                ..RawEntry::default()
            };
            let texts: [(&str, Option<String>); 5] = [
                ("dtype", e.dtype),
                ("steps", e.steps.map(|s| s.to_string())),
                ("sampler", e.sampler),
                ("guidance_scale", e.guidance_scale.map(|g| g.to_string())),
                ("guidance_schedule", e.guidance_schedule),
            ];
            for (key, value) in texts {
                if let Some(v) = value {
                    raw.set(key, &v)
                        .with_context(|| format!("model '{}'", e.name))?;
                }
            }
            Ok(raw)
        })
        .collect()
}

/// A model name: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit (it goes into
/// URLs, metric labels and logs unescaped).
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    anyhow::ensure!(
        ok,
        "model name '{name}' must be 1 to {MAX_NAME_LEN} letters, digits, '.', '_' or '-', \
         starting with a letter or digit"
    );
    Ok(())
}

/// Resolves a raw entry: the embedded model for `embedded`, the name from the file when none
/// is given, the VAE from `--vae` when the entry names none; every file must exist.
fn resolve(raw: RawEntry, globals: &Globals) -> anyhow::Result<ModelEntry> {
    let embedded = raw.path == Path::new(EMBEDDED);
    let model = if embedded {
        default_weights_dir()
            .map(|d| d.join(DEFAULT_MODEL_FILE))
            .context("the embedded default model (weights/) was not found")?
    } else {
        raw.path.clone()
    };
    let name = match raw.name {
        Some(n) => n,
        None => model
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string(),
    };
    check_name(&name).with_context(|| {
        format!(
            "{}: name it with --model NAME={}",
            model.display(),
            raw.path.display()
        )
    })?;
    let in_context = |e: anyhow::Error| e.context(format!("model '{name}'"));
    let vae = match (raw.vae, &globals.vae) {
        (Some(v), _) => v,
        (None, _) if embedded => model.with_file_name(DEFAULT_VAE_FILE),
        (None, Some(v)) => v.clone(),
        (None, None) => {
            return Err(in_context(anyhow::anyhow!(
                "no VAE: add vae=PATH (the VAE that decodes its latents), or give --vae for all"
            )))
        }
    };
    for (what, path) in [("model", &model), ("vae", &vae)] {
        if !path.exists() {
            return Err(in_context(anyhow::anyhow!(
                "{what} file {} does not exist",
                path.display()
            )));
        }
    }
    let vae_config = raw.vae_config.or_else(|| globals.vae_config.clone());
    if let Some(c) = vae_config.as_ref().filter(|c| !c.is_file()) {
        return Err(in_context(anyhow::anyhow!(
            "vae_config file {} does not exist",
            c.display()
        )));
    }
    Ok(ModelEntry {
        name,
        model,
        vae,
        vae_config,
        dtype: raw.dtype.or(globals.dtype).unwrap_or(Precision::F32),
        defaults: raw.defaults,
    })
}

/// Every model to serve, in the order given (flags first, then the file), or the embedded
/// default when neither names one. Names are unique.
pub fn entries(
    flags: &[String],
    file: Option<&Path>,
    globals: &Globals,
) -> anyhow::Result<Vec<ModelEntry>> {
    let mut raws = Vec::new();
    for text in flags.iter().filter(|t| !t.trim().is_empty()) {
        raws.push(parse_flag(text).with_context(|| format!("--model '{text}'"))?);
    }
    if let Some(path) = file {
        raws.extend(read_file(path).with_context(|| format!("--models {}", path.display()))?);
    }
    if raws.is_empty() {
        // The server as it always was: the embedded model (or --vae beside it).
        let (model, vae) = resolve_model_paths(None, globals.vae.clone())?;
        raws.push(RawEntry {
            path: model,
            vae: Some(vae),
            ..RawEntry::default()
        });
    }
    let mut seen = HashSet::new();
    raws.into_iter()
        .map(|raw| {
            let entry = resolve(raw, globals)?;
            anyhow::ensure!(
                seen.insert(entry.name.clone()),
                "model '{}' is given twice: every model needs its own name (NAME=PATH)",
                entry.name
            );
            Ok(entry)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn err(flags: &[&str], globals: &Globals) -> String {
        let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        format!("{:#}", entries(&flags, None, globals).unwrap_err())
    }

    #[test]
    fn flags_parse_names_paths_and_keys() {
        let m = fixture("diffit_tiny_model.safetensors");
        let v = fixture("vae_tiny_model.safetensors");
        let flags = vec![
            format!("a={m},vae={v},dtype=bf16,steps=20,sampler=ddim"),
            format!("{m},vae={v},guidance_scale=2.5,guidance_schedule=constant"),
            "fm=embedded".to_string(),
        ];
        let got = entries(&flags, None, &Globals::default()).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].name.as_str(), got[0].dtype), ("a", Precision::Bf16));
        assert_eq!(got[0].defaults.steps, Some(20));
        assert_eq!(got[0].defaults.sampler, Some(SamplerKind::Ddim));
        assert_eq!(
            got[1].name, "diffit_tiny_model",
            "a bare path is named after its file"
        );
        assert_eq!(got[1].defaults.guidance_scale, Some(2.5));
        assert_eq!(
            got[1].defaults.guidance_schedule,
            Some(GuidanceSchedule::Constant)
        );
        assert!(got[2].model.ends_with(DEFAULT_MODEL_FILE));
        assert!(got[2].vae.ends_with(DEFAULT_VAE_FILE));
        // No model flags: the embedded model, named after its file, as before.
        let default = entries(&[], None, &Globals::default()).unwrap();
        assert_eq!(default.len(), 1);
        assert_eq!(default[0].name, "diffit_fmnist");
    }

    #[test]
    fn bad_entries_name_the_model_and_the_problem() {
        let g = Globals::default();
        let m = fixture("diffit_tiny_model.safetensors");
        let v = fixture("vae_tiny_model.safetensors");
        let e = err(&["a=embedded", "a=embedded"], &g);
        assert!(e.contains("model 'a' is given twice"), "{e}");
        let e = err(&[&format!("a={m},vae={v},colour=red")], &g);
        assert!(
            e.contains("unknown key 'colour'") && e.contains("vae_config"),
            "{e}"
        );
        let e = err(&["b=/no/such.safetensors,vae=/no/vae"], &g);
        assert!(
            e.contains("model 'b'") && e.contains("does not exist"),
            "{e}"
        );
        let e = err(&[&format!("c={m}")], &g);
        assert!(e.contains("model 'c'") && e.contains("no VAE"), "{e}");
        let e = err(&["bad name=embedded"], &g);
        assert!(e.contains("model name 'bad name'"), "{e}");
        let e = err(&["d=embedded,dtype=f64"], &g);
        assert!(e.contains("dtype must be one of"), "{e}");
        let e = err(&["d=embedded,steps"], &g);
        assert!(e.contains("not key=value"), "{e}");
        // --vae serves every entry that names none.
        let with_vae = Globals {
            vae: Some(v.into()),
            ..Globals::default()
        };
        assert!(entries(&[format!("c={m}")], None, &with_vae).is_ok());
    }

    #[test]
    fn defaults_override_is_validated() {
        let base = SamplingDefaults::release(4);
        let o = DefaultsOverride {
            steps: Some(10),
            ..Default::default()
        };
        assert_eq!(o.apply(base).unwrap().steps, 10);
        let bad = DefaultsOverride {
            guidance_scale: Some(1e9),
            ..Default::default()
        };
        assert!(bad.apply(base).is_err());
    }

    #[test]
    fn model_files_in_toml_and_json() {
        let dir = std::env::temp_dir().join(format!("diffit-catalog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = fixture("diffit_tiny_model.safetensors");
        let v = fixture("vae_tiny_model.safetensors");
        let toml_path = dir.join("models.toml");
        std::fs::write(
            &toml_path,
            format!(
                "[[models]]\nname = \"tiny\"\npath = \"{m}\"\nvae = \"{v}\"\nsteps = 8\n\n\
                 [[models]]\nname = \"fm\"\npath = \"embedded\"\nsampler = \"ddim\"\n"
            ),
        )
        .unwrap();
        let got = entries(&[], Some(&toml_path), &Globals::default()).unwrap();
        assert_eq!(
            got.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["tiny", "fm"]
        );
        assert_eq!(got[0].defaults.steps, Some(8));
        let json_path = dir.join("models.json");
        std::fs::write(
            &json_path,
            format!(r#"{{"models": [{{"name": "j", "path": "{m}", "vae": "{v}", "size": 3}}]}}"#),
        )
        .unwrap();
        let e = format!(
            "{:#}",
            entries(&[], Some(&json_path), &Globals::default()).unwrap_err()
        );
        assert!(e.contains("unknown field `size`"), "{e}");
        let e = format!(
            "{:#}",
            entries(
                &["tiny=embedded".into()],
                Some(&toml_path),
                &Globals::default()
            )
            .unwrap_err()
        );
        assert!(e.contains("'tiny' is given twice"), "{e}");
        let yaml = dir.join("models.yaml");
        std::fs::write(&yaml, "models: []").unwrap();
        let e = format!(
            "{:#}",
            entries(&[], Some(&yaml), &Globals::default()).unwrap_err()
        );
        assert!(e.contains(".toml or .json"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
