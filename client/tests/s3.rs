//! The S3 origin backend against a real S3-compatible server on loopback (moto, installed
//! by .ci/run with `pip install 'moto[server]'`).

mod support;

use std::{
    collections::BTreeMap,
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use slapshot_client::{FleetClient, metrics::get, open_origin_with};
use slapshot_core::{ChunkName, SealedChunk};
use support::{TestFleet, eventually, random_chunks};

/// A moto S3 server on a free loopback port, with one bucket.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl S3Server {
    fn start(bucket: &str) -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server is not installed: pip install 'moto[server]' (as .ci/run does)");
        let endpoint = format!("http://127.0.0.1:{port}");
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        // The port accepts connections a little before moto answers requests: retry the
        // bucket creation until it gets an answer.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(stream) = std::net::TcpStream::connect(addr) {
                drop(stream);
                let created = std::panic::catch_unwind(|| {
                    slapshot_testkit::Client::connect(addr).request(
                        "PUT",
                        &format!("/{bucket}"),
                        &[],
                        &[],
                    )
                });
                if let Ok(created) = created {
                    assert_eq!(created.status, 200, "create bucket: {}", created.text());
                    break;
                }
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server { child, endpoint }
    }

    /// The settings a client needs, as object_store configuration keys.
    fn options(&self) -> BTreeMap<String, String> {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// The same settings as the standard AWS environment variables.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn s3_origin_stores_once_and_reads_back() {
    let s3 = S3Server::start("chunks");
    let origin = open_origin_with("s3://chunks/images/v1", &s3.options()).unwrap();
    let bytes = Bytes::from_static(b"a sealed chunk in s3");
    let name = ChunkName::of(&bytes);
    assert_eq!(origin.get(&name).await.unwrap(), None);
    assert!(
        origin
            .put(&SealedChunk::assume_sealed(bytes.clone()))
            .await
            .unwrap()
    );
    assert!(
        !origin
            .put(&SealedChunk::assume_sealed(bytes.clone()))
            .await
            .unwrap(),
        "an existing name is skipped"
    );
    assert_eq!(origin.get(&name).await.unwrap(), Some(bytes));
    // Under the prefix, in the chunk layout.
    let listed = slapshot_testkit::Client::connect(
        s3.endpoint.trim_start_matches("http://").parse().unwrap(),
    )
    .get("/chunks?list-type=2");
    let hex = name.to_hex();
    assert!(
        listed
            .text()
            .contains(&format!("images/v1/chunks/{}/{hex}", &hex[..2])),
        "{}",
        listed.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_falls_back_to_an_s3_origin_and_fills_itself() {
    let s3 = S3Server::start("origin");
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.origin = Some("s3://origin/prefix".into());
    config.origin_options = s3.options();
    let client = FleetClient::new(config).unwrap();
    let chunks = random_chunks(40, 6);
    for (_, bytes) in &chunks {
        client
            .origin()
            .unwrap()
            .put(&SealedChunk::assume_sealed(bytes.clone()))
            .await
            .unwrap();
    }
    for (name, bytes) in &chunks {
        assert_eq!(&client.get_chunk(name).await.unwrap().to_bytes(), bytes);
    }
    let m = client.metrics();
    assert_eq!(get(&m.origin_fetches), 6);
    eventually("fills", || get(&m.fill_shards_written) == 30).await;
    for (name, bytes) in &chunks {
        assert_eq!(&client.get_chunk(name).await.unwrap().to_bytes(), bytes);
    }
    assert_eq!(
        get(&m.origin_fetches),
        6,
        "the second pass is served by the fleet"
    );
    assert_eq!(get(&m.fleet_hits), 6);
}

#[test]
fn the_command_line_reads_through_s3_with_standard_aws_variables() {
    let s3 = S3Server::start("cli");
    let fleet = TestFleet::start(5);
    let mut config = fleet.config();
    config.origin = Some("s3://cli".into());
    let fleet_file = fleet.dir.path().join("fleet.toml");
    std::fs::write(&fleet_file, config.to_toml()).unwrap();
    let chunk = fleet.dir.path().join("chunk");
    std::fs::write(&chunk, slapshot_testkit::Rng::new(41).bytes(200_000)).unwrap();

    let slapshot = |args: &[&str]| {
        let output = Command::new(slapshot_testkit::slapshot_binary())
            .args(args)
            .envs(s3.env())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "slapshot {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    };
    let put = slapshot(&[
        "chunk",
        "put",
        "--fleet",
        fleet_file.to_str().unwrap(),
        chunk.to_str().unwrap(),
    ]);
    let name = String::from_utf8(put).unwrap().trim().to_owned();
    // Empty the fleet: the next read must come from S3.
    for node in &fleet.nodes {
        assert_eq!(
            node.client()
                .request("DELETE", &format!("/v1/shards/{name}"), &[], &[])
                .status,
            204
        );
    }
    let got = slapshot(&[
        "chunk",
        "get",
        "--fleet",
        fleet_file.to_str().unwrap(),
        &name,
    ]);
    assert!(got == std::fs::read(&chunk).unwrap());
}
