//! Issue 12 over HTTP on the real server: the page and the contract routes, image formats with
//! their metadata, seeds through a float64 JSON parser, live previews (bit-identical finals),
//! and the OpenAI route's prompts and fields on the embedded Fashion-MNIST model.

mod common;

use common::server::{b64, decode_png, TestServer};
use diffit_server::encode::read;
use serde_json::{json, Value};

#[tokio::test]
async fn page_and_contract_are_served_without_a_key() {
    let s = TestServer::start(&["--api-key", "k1"]).await;
    let r = s.get("/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    let html = r.text().await.unwrap();
    assert!(
        html.contains("data-auth=\"bearer\""),
        "the page knows it needs a key"
    );
    for contract in [
        "id=\"class\"",
        "aria-label=\"Results\"",
        "<progress",
        ">Generate<",
    ] {
        assert!(html.contains(contract), "page lacks {contract}");
    }
    let r = s.get("/openapi.yaml").await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().starts_with("openapi: 3.1"));
    // The API itself still wants the key.
    assert_eq!(s.get("/v1/models").await.status(), 401);
    let r = s
        .client
        .get(s.url("/v1/models/diffit_tiny_model"))
        .bearer_auth("k1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m: Value = r.json().await.unwrap();
    assert_eq!(m["id"], "diffit_tiny_model");
    assert_eq!(m["limits"]["max_steps"], 1000);
    let r = s
        .client
        .get(s.url("/v1/models/dall-e-3"))
        .bearer_auth("k1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("diffit_tiny_model"));

    let open = TestServer::start(&[]).await;
    let html = open.get("/").await.text().await.unwrap();
    assert!(html.contains("data-auth=\"none\""));
}

fn image_of(body: &Value, i: usize, format: &str) -> Vec<u8> {
    b64(body["images"][i][format!("b64_{format}")]
        .as_str()
        .unwrap_or_else(|| panic!("no b64_{format} in {body}")))
}

#[tokio::test]
async fn every_format_decodes_and_carries_its_metadata() {
    let s = TestServer::start(&[]).await;
    let base = json!({"class_label": 4, "seed": 77, "steps": 3});
    let mut pixels = Vec::new();
    for format in ["png", "jpeg", "webp"] {
        let mut req = base.clone();
        req["output_format"] = json!(format);
        req["output_compression"] = json!(90);
        let r = s.post("/generate", req).await;
        assert_eq!(r.status(), 200, "{format}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["output_format"], format);
        let bytes = image_of(&body, 0, format);
        let (meta, rgb) = match format {
            "png" => {
                let (w, h, c, px, text) = decode_png(&bytes);
                assert_eq!((w, h, c), (64, 64, 3));
                let meta = format!(
                    "seed: {}\nclass_label: {}",
                    text["seed"], text["class_label"]
                );
                (meta, px)
            }
            _ => {
                let img =
                    image::load_from_memory(&bytes).unwrap_or_else(|e| panic!("{format}: {e}"));
                assert_eq!((img.width(), img.height()), (64, 64), "{format}");
                let meta = match format {
                    "jpeg" => read::jpeg_comment(&bytes).expect("JPEG COM segment"),
                    _ => read::webp_xmp(&bytes).expect("WebP XMP chunk"),
                };
                (meta, img.to_rgb8().into_raw())
            }
        };
        for want in ["77", "class_label", "4"] {
            assert!(
                meta.contains(want),
                "{format} metadata lacks {want}: {meta}"
            );
        }
        pixels.push(rgb);
    }
    assert_eq!(
        pixels[0], pixels[2],
        "WebP is lossless: same pixels as the PNG"
    );
    let worst = pixels[0]
        .iter()
        .zip(&pixels[1])
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst < 64,
        "JPEG at quality 90 is close to the PNG ({worst})"
    );

    // Accept picks the raw file's format for n = 1.
    let r = s
        .client
        .post(s.url("/generate"))
        .header("accept", "image/webp")
        .json(&base)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/webp");
    assert_eq!(r.bytes().await.unwrap()[8..12], *b"WEBP");

    // Bad values: 422 naming the field and its limits (400 on the OpenAI route).
    for (field, value, words) in [
        ("output_format", json!("gif"), "png, jpeg or webp"),
        ("output_compression", json!(101), "between 0 and 100"),
        ("output_compression", json!(-1), "between 0 and 100"),
    ] {
        let mut req = base.clone();
        req[field] = value.clone();
        let r = s.post("/generate", req).await;
        assert_eq!(r.status(), 422, "{field}={value}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], field);
        assert!(e["error"]["message"].as_str().unwrap().contains(words));
        let r = s
            .post(
                "/v1/images/generations",
                json!({"prompt": "class 1", field: value}),
            )
            .await;
        assert_eq!(r.status(), 400, "OpenAI route {field}={value}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], field);
    }
}

#[tokio::test]
async fn random_seeds_survive_a_float64_json_parser() {
    let s = TestServer::start(&[]).await;
    let req = json!({"class_label": 2, "n": 3, "steps": 3});
    let body: Value = s.post("/generate", req.clone()).await.json().await.unwrap();
    for (i, img) in body["images"].as_array().unwrap().iter().enumerate() {
        let seed = img["seed"].as_u64().unwrap();
        assert!(seed < 1 << 53, "random seed {seed} is above 2^53");
        assert_eq!(img["seed_str"], seed.to_string());
        // What JavaScript or jq does: parse the number as a float64, then print it again (an
        // integral float64 below 1e21 prints as its integer digits) and send it back.
        let as_js = img["seed"].as_f64().unwrap();
        assert_eq!(as_js as u64, seed, "a float64 parser keeps the seed exact");
        let text = format!(r#"{{"class_label": 2, "steps": 3, "seed": {as_js:.0}}}"#);
        let again: Value = s
            .client
            .post(s.url("/generate"))
            .body(text)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(again["images"][0]["seed_str"], img["seed_str"]);
        let (.., px_a, _) = decode_png(&image_of(&body, i, "png"));
        let (.., px_b, _) = decode_png(&image_of(&again, 0, "png"));
        assert_eq!(px_a, px_b, "image {i}: the echoed seed reproduces it");
    }
    // Any u64 is accepted and echoed exactly; seed + n − 1 past u64 is refused, not wrapped.
    let max = u64::MAX;
    let r = s
        .post(
            "/generate",
            json!({"class_label": 1, "steps": 2, "seed": max}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["images"][0]["seed_str"], max.to_string());
    assert_eq!(body["images"][0]["seed"].as_u64(), Some(max));
    let r = s
        .post(
            "/generate",
            json!({"class_label": 1, "steps": 2, "seed": max, "n": 2}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "seed");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("18446744073709551615"));
}

/// (event name, parsed data) of every server-sent event in a body.
fn events(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((name.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    out
}

#[tokio::test]
async fn previews_stream_and_leave_the_images_unchanged() {
    let s = TestServer::start(&[]).await;
    let req =
        json!({"class_label": 5, "n": 2, "seed": 900, "steps": 20, "sampler": "dpm-solver++"});
    let plain: Value = s.post("/generate", req.clone()).await.json().await.unwrap();

    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    streamed["preview"] = json!(true);
    let text = s.post("/generate", streamed).await.text().await.unwrap();
    let evs = events(&text);
    let previews: Vec<&Value> = evs
        .iter()
        .filter(|(n, d)| n == "progress" && d.get("preview").is_some())
        .map(|(_, d)| &d["preview"])
        .collect();
    // 20 steps, a preview every 2 steps before the last: 9 per image.
    assert_eq!(previews.len(), 18, "{text}");
    for p in &previews {
        let (w, h, c, _, _) = decode_png(&b64(p["b64_png"].as_str().unwrap()));
        // The tiny fixture's latents are 8x8; its VAE makes RGB.
        assert_eq!((w, h, c), (8, 8, 3));
        assert_eq!(
            (p["width"].as_u64(), p["height"].as_u64()),
            (Some(8), Some(8))
        );
        assert!(p["index"].as_u64().unwrap() < 2);
    }
    let steps_of_0: Vec<u64> = previews
        .iter()
        .filter(|p| p["index"] == 0)
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps_of_0, [2, 4, 6, 8, 10, 12, 14, 16, 18]);
    let (name, result) = evs.last().unwrap();
    assert_eq!(name, "result");
    for i in 0..2 {
        assert_eq!(
            image_of(result, i, "png"),
            image_of(&plain, i, "png"),
            "image {i} is bit-identical with previews"
        );
    }

    // Without stream there are no events to carry previews: same JSON, same images.
    let mut quiet = req.clone();
    quiet["preview"] = json!(true);
    let r: Value = s.post("/generate", quiet).await.json().await.unwrap();
    assert_eq!(image_of(&r, 1, "png"), image_of(&plain, 1, "png"));
}

#[tokio::test]
async fn openai_prompts_and_fields_on_the_embedded_model() {
    // The embedded Fashion-MNIST model and its class names.
    let s = TestServer::start_with(&[]).await;
    let oai = "/v1/images/generations";
    for (prompt, class) in [
        ("sneakers", "Sneaker"),
        ("a photo of a red sneaker", "Sneaker"),
        ("Boots", "Ankle boot"),
        ("tshirt", "T-shirt/top"),
        ("a striped shirt", "Shirt"),
    ] {
        let r = s.post(oai, json!({"prompt": prompt, "steps": 2})).await;
        assert_eq!(r.status(), 200, "{prompt}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["data"][0]["revised_prompt"], class, "{prompt}");
    }
    let r = s.post(oai, json!({"prompt": "a dress and a coat"})).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "prompt");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("Dress") && msg.contains("Coat"), "{msg}");

    // Today's Images API fields.
    let r = s
        .post(
            oai,
            json!({"prompt": "bag", "size": "auto", "response_format": "url", "output_format": "jpeg",
                   "output_compression": 80, "background": "opaque", "quality": "high",
                   "moderation": "low", "user": "tester-1", "steps": 2, "seed": 3}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["output_format"], "jpeg");
    assert_eq!(body["size"], "32x32");
    let url = body["data"][0]["url"].as_str().unwrap();
    let jpeg = b64(url.strip_prefix("data:image/jpeg;base64,").unwrap());
    assert_eq!(image::load_from_memory(&jpeg).unwrap().width(), 32);
    assert!(read::jpeg_comment(&jpeg)
        .unwrap()
        .contains("class_name: Bag"));
    assert_eq!(body["data"][0]["seed_str"], "3");

    let r = s
        .post(oai, json!({"prompt": "bag", "background": "transparent"}))
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["param"],
        "background"
    );
    for (field, value) in [
        ("quality", json!("ultra")),
        ("size", json!("1024x1024")),
        ("stream", json!(true)),
        ("negative_prompt", json!("blurry")),
    ] {
        let r = s.post(oai, json!({"prompt": "bag", field: value})).await;
        assert_eq!(r.status(), 400, "{field}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], field);
    }
}

/// The preview projection (fitted at start-up on random latents) must look like the image:
/// the last preview against the final image averaged down to latent resolution.
#[tokio::test]
async fn the_last_preview_looks_like_the_final_image() {
    let s = TestServer::start_with(&[]).await;
    for class in [0, 7, 9] {
        let req =
            json!({"class_label": class, "seed": 31, "steps": 10, "stream": true, "preview": true});
        let text = s.post("/generate", req).await.text().await.unwrap();
        let evs = events(&text);
        let last = evs
            .iter()
            .filter_map(|(_, d)| d.get("preview"))
            .next_back()
            .expect("previews");
        assert_eq!(last["step"], 9);
        let (pw, ph, pc, preview, _) = decode_png(&b64(last["b64_png"].as_str().unwrap()));
        assert_eq!((pw, ph, pc), (8, 8, 1), "gray, at latent resolution");
        let (w, _, _, image, _) = decode_png(&image_of(&evs.last().unwrap().1, 0, "png"));
        let f = (w / pw) as usize;
        let down: Vec<f64> = (0..64)
            .map(|k| {
                let (i, j) = (k / 8, k % 8);
                let sum: u32 = (0..f * f)
                    .map(|d| image[(i * f + d / f) * w as usize + j * f + d % f] as u32)
                    .sum();
                sum as f64 / (f * f) as f64
            })
            .collect();
        let p: Vec<f64> = preview.iter().map(|&v| v as f64).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (mp, md) = (mean(&p), mean(&down));
        let cov: f64 = p.iter().zip(&down).map(|(a, b)| (a - mp) * (b - md)).sum();
        let var = |v: &[f64], m: f64| v.iter().map(|a| (a - m) * (a - m)).sum::<f64>();
        let corr = cov / (var(&p, mp) * var(&down, md)).sqrt();
        assert!(
            corr > 0.85,
            "class {class}: preview/final correlation {corr:.3}"
        );
    }
}

/// Text logs into a pipe (not a terminal) carry no ANSI colour codes.
#[tokio::test]
async fn logs_off_a_terminal_have_no_colour_codes() {
    let (_server, logs) = TestServer::start_logging(&[], "info").await;
    let mut seen = Vec::new();
    while let Ok(line) = logs.recv_timeout(std::time::Duration::from_secs(10)) {
        let ready = line.contains("engine ready");
        seen.push(line);
        if ready || seen.len() > 200 {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains(" INFO ")),
        "info lines logged: {seen:?}"
    );
    assert!(
        seen.iter().all(|l| !l.contains('\u{1b}')),
        "escape codes in {seen:?}"
    );
}
