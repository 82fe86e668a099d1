//! `qwen-edit serve` as a client sees it: the binary runs on the demo model on localhost, and plain HTTP requests
//! check the OpenAI-style edit (multipart and JSON), per-image reuse in the metrics, server-sent progress, the
//! bad-request suite (a 4xx JSON error each, and a health check after each), 429 + Retry-After when the queue is
//! full, the request timeout, and SIGTERM under load (jobs finish or are reported cancelled, no files left).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One multipart part: field name, file name, bytes.
type FormPart<'a> = (&'a str, Option<&'a str>, &'a [u8]);

/// A server process, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qwen-edit"))
            .args(["serve", "--demo", "--port", "0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.trim().strip_prefix("listening on ").expect("the address line").to_owned();
        let server = Server { child, base };
        let start = Instant::now();
        while get(&server.url("/ready")).0 != 200 {
            assert!(start.elapsed() < Duration::from_secs(60), "the model did not load");
            thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn healthy(&self) -> bool {
        get(&self.url("/health")).0 == 200
    }

    fn sigterm(&self) {
        let ok =
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status, `Retry-After`, body.
type Reply = (u16, Option<String>, String);

fn reply(r: Result<ureq::Response, ureq::Error>) -> Reply {
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return (0, None, e.to_string()),
    };
    let (status, retry) = (r.status(), r.header("retry-after").map(str::to_owned));
    (status, retry, r.into_string().unwrap_or_default())
}

fn get(url: &str) -> Reply {
    reply(ureq::get(url).timeout(Duration::from_secs(30)).call())
}

fn post(url: &str, content_type: &str, body: &[u8]) -> Reply {
    reply(
        ureq::post(url).set("Content-Type", content_type).timeout(Duration::from_secs(120)).send_bytes(body),
    )
}

/// A multipart form: (name, filename for files, bytes).
fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "qwen-test-boundary-7d1c";
    let mut body = Vec::new();
    for (name, file, value) in fields {
        write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").unwrap();
        match file {
            Some(f) => write!(body, "; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n").unwrap(),
            None => write!(body, "\r\n\r\n").unwrap(),
        }
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn png() -> &'static [u8] {
    qwen_image_pipeline::demo::SAMPLE_PNG
}

fn edit(server: &Server, extra: &[(&str, Option<&str>, &[u8])]) -> Reply {
    let mut fields: Vec<(&str, Option<&str>, &[u8])> =
        vec![("image", Some("in.png"), png()), ("prompt", None, b"Make it purple"), ("steps", None, b"2")];
    fields.extend_from_slice(extra);
    let (ct, body) = multipart(&fields);
    post(&server.url("/v1/images/edits"), &ct, &body)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn decoded_image(b64: &str) -> image::RgbImage {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

#[test]
fn openai_style_edits_reuse_the_image_and_stream_progress() {
    let server = Server::start(&[]);
    let models = json(&get(&server.url("/v1/models")).2);
    assert_eq!(models["data"][0]["id"], "qwen-image-edit-demo");

    let (status, _, body) =
        edit(&server, &[("response_format", None, b"b64_json"), ("model", None, b"qwen-image-edit-demo")]);
    assert_eq!(status, 200, "{body}");
    let first = json(&body);
    let img = decoded_image(first["data"][0]["b64_json"].as_str().unwrap());
    assert_eq!((img.width(), img.height()), (160, 96), "the demo's 128²-area output of the 3:2 sample");
    assert_eq!(first["qwen"][0]["image_reuse"]["misses"], 2);

    // The same image again (as JSON with a data URL): both encodings reused, the metrics count the hits.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(png());
    let body = serde_json::json!({"image": format!("data:image/png;base64,{b64}"), "prompt": "Add a hat", "steps": 2, "n": 2});
    let (status, _, text) =
        post(&server.url("/v1/images/edits"), "application/json", body.to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
    let second = json(&text);
    assert_eq!(second["data"].as_array().unwrap().len(), 2);
    assert_eq!(second["qwen"][0]["image_reuse"]["hits"], 2);
    assert_eq!(second["qwen"][1]["seed"], 43, "n images get seeds seed, seed + 1");
    let metrics = get(&server.url("/metrics")).2;
    assert!(metrics.contains("qwen_edit_reuse_hits_total 4"), "{metrics}");
    assert!(metrics.contains("qwen_edit_jobs_total{outcome=\"ok\"} 3"), "{metrics}");
    assert!(metrics.contains("qwen_edit_queue_depth 0"), "{metrics}");

    // Server-sent progress: stages, steps with an ETA, then the image.
    let (status, _, events) = edit(&server, &[("stream", None, b"true"), ("steps", None, b"3")]);
    assert_eq!(status, 200, "{events}");
    let data: Vec<Value> = events.lines().filter_map(|l| l.strip_prefix("data: ")).map(json).collect();
    let steps: Vec<&Value> = data.iter().filter(|d| d["step"].is_u64()).collect();
    assert_eq!(steps.len(), 3, "{events}");
    assert!(steps.iter().all(|s| s["eta_seconds"].as_f64().unwrap() >= 0.0));
    assert!(data.iter().any(|d| d["stage"] == "encode_image"));
    let done = data.last().unwrap();
    assert_eq!(done["type"], "image_edit.completed");
    decoded_image(done["b64_json"].as_str().unwrap());
    assert!(server.healthy());
}

/// `serve --demo` runs the model of `qwen-edit --demo` with its settings (areas, steps, scheduler, text positions):
/// the trained proxy when this build bundles it, else the tiny random model. The same edit through both gives the
/// same pixels.
#[test]
fn the_server_and_the_cli_demo_run_the_same_model_with_the_same_settings() {
    let server = Server::start(&["--schedule", "none"]);
    let (status, _, body) = edit(&server, &[("seed", None, b"7")]);
    assert_eq!(status, 200, "{body}");
    let served = decoded_image(json(&body)["data"][0]["b64_json"].as_str().unwrap());
    let dir = std::env::temp_dir().join(format!("qwen-serve-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("in.png"), png()).unwrap();
    let cli = Command::new(env!("CARGO_BIN_EXE_qwen-edit"))
        .current_dir(&dir)
        .args([
            "--demo",
            "-i",
            "in.png",
            "-p",
            "Make it purple",
            "-s",
            "2",
            "--seed",
            "7",
            "--no-pruning",
            "-q",
        ])
        .args(["-o", "out"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&cli.stderr));
    let bundled = qwen_image_proxy::is_bundled(qwen_image_pipeline::Variant::Edit);
    assert_eq!(stdout.contains("trained Qwen-Image-Edit proxy"), bundled, "{stdout}");
    let local = image::open(dir.join("out/latest_baseline.png")).unwrap().to_rgb8();
    assert_eq!(local.dimensions(), served.dimensions());
    assert!(local == served, "the server's demo edit differs from the CLI's");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_demo_takes_no_lora() {
    let o = Command::new(env!("CARGO_BIN_EXE_qwen-edit"))
        .args(["serve", "--demo", "--port", "0", "--lora", "x.safetensors"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--lora applies to --model"), "{err}");
}

#[test]
fn bad_requests_get_a_json_4xx_and_the_server_keeps_serving() {
    let server = Server::start(&["--max-body-mib", "1"]);
    let url = server.url("/v1/images/edits");
    let img: (&str, Option<&str>, &[u8]) = ("image", Some("in.png"), png());
    let prompt: (&str, Option<&str>, &[u8]) = ("prompt", None, b"x");
    let tiny = tiny_png();
    let hundred: Vec<_> = (0..100).map(|_| ("image[]", Some("a.png"), &tiny[..])).collect();
    let bomb = bomb_png();
    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        ("malformed multipart", "multipart/form-data; boundary=zz".into(), b"--zz\r\nbroken".to_vec(), 400),
        ("no boundary", "multipart/form-data".into(), b"x".to_vec(), 400),
        ("wrong content type", "text/plain".into(), b"hello".to_vec(), 415),
        ("bad JSON", "application/json".into(), b"{\"prompt\": ".to_vec(), 400),
        (
            "unknown JSON field",
            "application/json".into(),
            br#"{"image": "", "prompt": "x", "colour": 1}"#.to_vec(),
            400,
        ),
    ];
    let forms: Vec<(&str, Vec<FormPart>, u16)> = vec![
        ("no image", vec![prompt], 400),
        ("no prompt", vec![img], 400),
        ("not an image", vec![("image", Some("a.png"), b"GIF89a not really"), prompt], 400),
        ("decompression bomb", vec![("image", Some("bomb.png"), &bomb), prompt], 400),
        ("unknown field", vec![img, prompt, ("colour", None, b"red")], 400),
        ("invalid schedule", vec![img, prompt, ("schedule", None, b"reuse:9")], 400),
        ("bad schedule syntax", vec![img, prompt, ("schedule", None, b"sometimes")], 400),
        ("100 images", [hundred.clone(), vec![prompt]].concat(), 400),
        ("two images for Edit v1", vec![img, img, prompt], 400),
        ("n = 0", vec![img, prompt, ("n", None, b"0")], 400),
        ("steps = 0", vec![img, prompt, ("steps", None, b"0")], 400),
        ("bad size", vec![img, prompt, ("size", None, b"big")], 400),
        ("url format", vec![img, prompt, ("response_format", None, b"url")], 400),
        ("a mask", vec![img, prompt, ("mask", Some("m.png"), png())], 400),
        ("other model", vec![img, prompt, ("model", None, b"dall-e-2")], 400),
    ];
    let mut all = cases;
    for (name, fields, want) in forms {
        let (ct, body) = multipart(&fields);
        all.push((name, ct, body, want));
    }
    for (name, content_type, body, want) in all {
        let (status, _, text) = post(&url, &content_type, &body);
        assert_eq!(status, want, "{name}: {text}");
        let error = json(&text);
        assert!(error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: {text}");
        assert!(server.healthy(), "{name}: the server stopped serving");
    }
    // A huge declared body is refused before it is sent (the client waits for 100 Continue).
    let mut s = TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
    write!(s, "POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").unwrap();
    let mut head = String::new();
    s.read_to_string(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("\"error\""), "{head}");
    assert_eq!(get(&server.url("/nowhere")).0, 404);
    // Still serving edits.
    assert_eq!(edit(&server, &[]).0, 200);
}

/// A 1×1 PNG.
fn tiny_png() -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::new(1, 1)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

/// A valid PNG header of 60000×60000 pixels with a tiny body.
fn bomb_png() -> Vec<u8> {
    let mut bytes = tiny_png();
    // IHDR: width at 16..20, height at 20..24, CRC at 29..33.
    bytes[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Runs `count` edits of `steps` steps at once; their replies.
fn burst(server: &Server, count: usize, steps: &'static [u8]) -> Vec<Reply> {
    let handles: Vec<_> = (0..count)
        .map(|_| {
            let (ct, body) =
                multipart(&[("image", Some("a.png"), png()), ("prompt", None, b"x"), ("steps", None, steps)]);
            let url = server.url("/v1/images/edits");
            thread::spawn(move || post(&url, &ct, &body))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn a_full_queue_answers_429_and_a_slow_edit_times_out() {
    let server = Server::start(&["--queue-capacity", "1", "--timeout-seconds", "20"]);
    let replies = burst(&server, 8, b"12");
    let full: Vec<&Reply> = replies.iter().filter(|r| r.0 == 429).collect();
    assert!(!full.is_empty(), "{:?}", replies.iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(
        full.iter().all(|r| r.1.as_deref().is_some_and(|s| s.parse::<u64>().unwrap() >= 1)),
        "Retry-After"
    );
    assert!(
        replies.iter().all(|r| r.0 == 200 || r.0 == 429),
        "{:?}",
        replies.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    let metrics = get(&server.url("/metrics")).2;
    assert!(metrics.contains("qwen_edit_jobs_total{outcome=\"queue_full\"}"), "{metrics}");
    drop(server);

    let server = Server::start(&["--timeout-seconds", "0.2"]);
    let (status, _, text) = edit(&server, &[("steps", None, b"100")]);
    assert_eq!(status, 504, "{text}");
    assert_eq!(json(&text)["error"]["code"], "timeout");
    assert!(server.healthy());
}

#[test]
fn sigterm_under_load_finishes_or_cancels_every_job_and_leaves_no_files() {
    let mut server = Server::start(&["--shutdown-grace-seconds", "1.5"]);
    let pid = server.child.id();
    let demo_dir = std::env::temp_dir().join(format!("qwen-edit-serve-{pid}"));
    assert!(!demo_dir.exists(), "the demo snapshot is removed once loaded");
    // Jobs of about 0.4 s on this machine and demo model (the trained proxy is far slower than the tiny random
    // model), so that the first ones finish within the grace period and the later ones are cancelled.
    let start = Instant::now();
    assert_eq!(edit(&server, &[]).0, 200, "a 2-step edit");
    let per_step = start.elapsed().as_secs_f64() / 2.0;
    let steps = ((0.4 / per_step).round() as usize).clamp(1, 12).to_string();
    let url = server.url("/v1/images/edits");
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (url, steps) = (url.clone(), steps.clone());
            thread::spawn(move || {
                let (ct, body) = multipart(&[
                    ("image", Some("a.png"), png()),
                    ("prompt", None, b"x"),
                    ("steps", None, steps.as_bytes()),
                ]);
                post(&url, &ct, &body)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    server.sigterm();
    let replies: Vec<Reply> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    let codes: Vec<u16> = replies.iter().map(|r| r.0).collect();
    for (status, _, text) in &replies {
        match status {
            200 => assert!(json(text)["data"][0]["b64_json"].is_string()),
            503 => assert_eq!(json(text)["error"]["code"], "shutting_down", "{text}"),
            0 => {} // sent after the listener closed: refused, never accepted
            _ => panic!("unexpected {status}: {text} ({codes:?})"),
        }
    }
    assert!(codes.contains(&200), "{codes:?}");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the server did not exit");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!demo_dir.exists());
}
