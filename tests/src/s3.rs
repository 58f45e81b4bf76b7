//! A real S3-protocol server over HTTP on 127.0.0.1, backed by a directory: `s3s` parses and
//! authenticates requests (SigV4), `s3s-fs` stores objects as files.
//!
//! A GET with `If-None-Match` whose ETag still matches answers `304 Not Modified`, as S3 does
//! (s3s-fs ignores the header on GET); the job-wide notice is polled that way.
//!
//! Three things are added on top of s3s-fs 0.14.1, because the tests need them and a real store
//! has them: `ListMultipartUploads` (s3s-fs answers NotImplemented), so tests can prove no
//! multipart upload was left behind; verification of `x-amz-checksum-crc32c` on `UploadPart`
//! (s3s-fs checks it on PutObject only), so a part corrupted in flight is refused with
//! `BadDigest` like AWS does; and `404 NoSuchUpload` for an upload id the store does not know
//! (completed, aborted or never created) where s3s-fs answers `403 AccessDenied`, so a client
//! that repeats a CompleteMultipartUpload whose answer it lost hears what AWS would say. GET bodies are read from the object's file in 256 KiB
//! reads rather than s3s-fs's 4 KiB ones (see [`GET_CHUNK`]), so benchmarks measure clients.
//!
//! The server runs on its own thread and runtime, so it keeps serving while a test blocks on a
//! child process; dropping the [`S3Server`] stops it.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use hyper_util::rt::TokioIo;
use s3s::dto::*;
use s3s::stream::{ByteStream, RemainingLength};
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};
use tokio_util::sync::CancellationToken;

/// Credentials the server accepts (SigV4 is checked, as a real store would).
pub const ACCESS_KEY: &str = "nerve-test-access";
pub const SECRET_KEY: &str = "nerve-test-secret";
/// Region clients should sign for.
pub const REGION: &str = "us-east-1";
/// Worker threads of the server's runtime: enough that a test's client and the server do not
/// starve each other on a 2-core machine.
const SERVER_THREADS: usize = 2;

/// A running server. Stops when dropped.
pub struct S3Server {
    addr: SocketAddr,
    root: PathBuf,
    _temp: Option<tempfile::TempDir>,
    uploads: Uploads,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl S3Server {
    /// Starts a server on 127.0.0.1:0 storing into a fresh temporary directory.
    pub fn start() -> io::Result<S3Server> {
        let temp = tempfile::Builder::new().prefix("nerve-s3-").tempdir()?;
        let root = temp.path().to_path_buf();
        let mut server = S3Server::start_at(&root, SocketAddr::from(([127, 0, 0, 1], 0)))?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// Starts a server storing into `root` (which must exist), listening on `listen`.
    pub fn start_at(root: &Path, listen: SocketAddr) -> io::Result<S3Server> {
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| io::Error::other(format!("{e:?}")))?;
        let uploads = Uploads::default();
        let store = TestStore {
            fs: Arc::new(fs),
            root: root.to_path_buf(),
            uploads: uploads.clone(),
        };
        let mut builder = s3s::service::S3ServiceBuilder::new(store);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SERVER_THREADS)
            .thread_name("nerve-s3")
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("nerve-s3".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        return;
                    };
                    let tracker = tokio_util::task::TaskTracker::new();
                    loop {
                        let socket = tokio::select! {
                            () = stop.cancelled() => break,
                            accepted = listener.accept() => match accepted {
                                Ok((socket, _)) => socket,
                                Err(_) => continue,
                            },
                        };
                        let _ = socket.set_nodelay(true);
                        let service = service.clone();
                        let stop = stop.clone();
                        tracker.spawn(async move {
                            let conn = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(socket), service);
                            tokio::select! {
                                _ = conn => {}
                                () = stop.cancelled() => {}
                            }
                        });
                    }
                    tracker.close();
                });
            })?;
        Ok(S3Server {
            addr,
            root: root.to_path_buf(),
            _temp: None,
            uploads,
            shutdown,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The directory objects are stored in (`<root>/<bucket>/<key>`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates a bucket (a directory, as s3s-fs stores them).
    pub fn create_bucket(&self, name: &str) -> io::Result<()> {
        std::fs::create_dir_all(self.root.join(name))
    }

    /// Path of the file holding an object, for tests that tamper with stored bytes.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }

    /// Multipart uploads created and neither completed nor aborted, as `(key, upload id)`.
    pub fn incomplete_uploads(&self) -> Vec<(String, String)> {
        self.uploads
            .lock()
            .values()
            .map(|u| (u.key.clone(), u.upload_id.clone()))
            .collect()
    }

    /// Environment for a client process (the AWS SDK chain, the AWS CLI, s5cmd).
    pub fn client_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_DEFAULT_REGION", REGION.to_owned()),
            // Keep a developer's own profile and IMDS out of the picture.
            ("AWS_CONFIG_FILE", "/dev/null".to_owned()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Clone)]
struct OpenUpload {
    bucket: String,
    key: String,
    upload_id: String,
    initiated: time::OffsetDateTime,
}

/// Multipart uploads in progress, by upload id.
#[derive(Clone, Default)]
struct Uploads(Arc<Mutex<BTreeMap<String, OpenUpload>>>);

impl Uploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OpenUpload>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct TestStore {
    fs: Arc<s3s_fs::FileSystem>,
    /// s3s-fs's root: objects are files at `<root>/<bucket>/<key>`.
    root: PathBuf,
    uploads: Uploads,
}

impl TestStore {
    /// `NoSuchUpload` unless s3s-fs holds the upload: it keeps one `.upload-<id>.json` in its
    /// root per upload in progress (so this survives a restart of the server, as with AWS).
    fn check_upload_exists(root: &Path, upload_id: &str) -> S3Result<()> {
        if root.join(format!(".upload-{upload_id}.json")).is_file() {
            Ok(())
        } else {
            Err(s3_error!(
                NoSuchUpload,
                "The specified multipart upload does not exist. The upload ID may be invalid, \
                 or the upload may have been aborted or completed."
            ))
        }
    }
}

type S3Future<'a, T> = Pin<Box<dyn Future<Output = S3Result<S3Response<T>>> + Send + 'a>>;

/// Passes an operation straight to s3s-fs (in the shape `#[async_trait]` gives trait methods).
macro_rules! delegate {
    ($($name:ident($input:ident) -> $output:ident;)*) => {$(
        fn $name<'life0, 'async_trait>(
            &'life0 self,
            req: S3Request<$input>,
        ) -> S3Future<'async_trait, $output>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(self.fs.$name(req))
        }
    )*};
}

impl S3 for TestStore {
    delegate! {
        create_bucket(CreateBucketInput) -> CreateBucketOutput;
        delete_bucket(DeleteBucketInput) -> DeleteBucketOutput;
        head_bucket(HeadBucketInput) -> HeadBucketOutput;
        list_buckets(ListBucketsInput) -> ListBucketsOutput;
        get_bucket_location(GetBucketLocationInput) -> GetBucketLocationOutput;
        put_object(PutObjectInput) -> PutObjectOutput;
        head_object(HeadObjectInput) -> HeadObjectOutput;
        copy_object(CopyObjectInput) -> CopyObjectOutput;
        delete_object(DeleteObjectInput) -> DeleteObjectOutput;
        delete_objects(DeleteObjectsInput) -> DeleteObjectsOutput;
        list_objects(ListObjectsInput) -> ListObjectsOutput;
        list_objects_v2(ListObjectsV2Input) -> ListObjectsV2Output;
        upload_part_copy(UploadPartCopyInput) -> UploadPartCopyOutput;
        list_parts(ListPartsInput) -> ListPartsOutput;
    }

    fn get_object<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<GetObjectInput>,
    ) -> S3Future<'async_trait, GetObjectOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let path = self.root.join(&req.input.bucket).join(&req.input.key);
            let unless = req.input.if_none_match.clone();
            // s3s-fs resolves the object, range and headers; the body is read anew, see
            // GET_CHUNK.
            let mut response = self.fs.get_object(req).await?;
            // A conditional GET whose ETag still matches answers 304, as S3 does (s3s-fs
            // ignores If-None-Match on GET).
            let unchanged = match (&unless, &response.output.e_tag) {
                (Some(condition), Some(tag)) => {
                    condition.is_any()
                        || condition
                            .as_etag()
                            .is_some_and(|c| c.value() == tag.value())
                }
                _ => false,
            };
            if unchanged {
                return Err(s3_error!(NotModified));
            }
            if response.output.body.take().is_some() {
                let len = response
                    .output
                    .content_length
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0);
                let offset = response
                    .output
                    .content_range
                    .as_deref()
                    .and_then(range_start)
                    .unwrap_or(0);
                let body = FileBody::open(&path, offset, len)
                    .await
                    .map_err(|e| s3_error!(e, InternalError))?;
                response.output.body = Some(StreamingBlob::new(body));
            }
            Ok(response)
        })
    }

    fn create_multipart_upload<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Future<'async_trait, CreateMultipartUploadOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let (fs, uploads) = (self.fs.clone(), self.uploads.clone());
        finish_even_if_the_client_leaves(async move {
            let response = fs.create_multipart_upload(req).await?;
            let output = &response.output;
            if let (Some(bucket), Some(key), Some(upload_id)) =
                (&output.bucket, &output.key, &output.upload_id)
            {
                uploads.lock().insert(
                    upload_id.clone(),
                    OpenUpload {
                        bucket: bucket.clone(),
                        key: key.clone(),
                        upload_id: upload_id.clone(),
                        initiated: time::OffsetDateTime::now_utc(),
                    },
                );
            }
            Ok(response)
        })
    }

    fn upload_part<'life0, 'async_trait>(
        &'life0 self,
        mut req: S3Request<UploadPartInput>,
    ) -> S3Future<'async_trait, UploadPartOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            TestStore::check_upload_exists(&self.root, &req.input.upload_id)?;
            let expected = req.input.checksum_crc32c.clone();
            let Some(expected) = expected else {
                return self.fs.upload_part(req).await;
            };
            let expected = decode_crc32c(&expected).ok_or_else(|| {
                s3_error!(
                    InvalidDigest,
                    "x-amz-checksum-crc32c is not base64 of 4 bytes"
                )
            })?;
            let body = req
                .input
                .body
                .take()
                .ok_or_else(|| s3_error!(IncompleteBody))?;
            let verdict = Arc::new(Mutex::new(None));
            req.input.body = Some(StreamingBlob::new(CrcCheckedBody {
                inner: body,
                crc: 0,
                expected,
                verdict: verdict.clone(),
                done: false,
            }));
            let result = self.fs.upload_part(req).await;
            let mismatch = verdict
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|ok: bool| !ok);
            if mismatch {
                return Err(s3_error!(BadDigest, "checksum_crc32c mismatch"));
            }
            result
        })
    }

    fn complete_multipart_upload<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Future<'async_trait, CompleteMultipartUploadOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let (fs, uploads, root) = (self.fs.clone(), self.uploads.clone(), self.root.clone());
        finish_even_if_the_client_leaves(async move {
            let upload_id = req.input.upload_id.clone();
            TestStore::check_upload_exists(&root, &upload_id)?;
            let response = fs.complete_multipart_upload(req).await?;
            uploads.lock().remove(&upload_id);
            Ok(response)
        })
    }

    fn abort_multipart_upload<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Future<'async_trait, AbortMultipartUploadOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let (fs, uploads, root) = (self.fs.clone(), self.uploads.clone(), self.root.clone());
        finish_even_if_the_client_leaves(async move {
            let upload_id = req.input.upload_id.clone();
            TestStore::check_upload_exists(&root, &upload_id)?;
            let response = fs.abort_multipart_upload(req).await?;
            uploads.lock().remove(&upload_id);
            Ok(response)
        })
    }

    fn list_multipart_uploads<'life0, 'async_trait>(
        &'life0 self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Future<'async_trait, ListMultipartUploadsOutput>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let input = req.input;
            let prefix = input.prefix.clone().unwrap_or_default();
            let uploads: Vec<MultipartUpload> = self
                .uploads
                .lock()
                .values()
                .filter(|u| u.bucket == input.bucket && u.key.starts_with(&prefix))
                .map(|u| MultipartUpload {
                    key: Some(u.key.clone()),
                    upload_id: Some(u.upload_id.clone()),
                    initiated: Some(u.initiated.into()),
                    ..Default::default()
                })
                .collect();
            Ok(S3Response::new(ListMultipartUploadsOutput {
                bucket: Some(input.bucket),
                prefix: input.prefix,
                is_truncated: Some(false),
                uploads: (!uploads.is_empty()).then_some(uploads),
                ..Default::default()
            }))
        })
    }
}

/// Runs an operation that changes the upload bookkeeping to its end on its own task. hyper drops
/// a handler whose client hung up (a SIGKILLed sidecar); a real store finishes the operation,
/// and the bookkeeping here must not disagree with the files s3s-fs wrote.
fn finish_even_if_the_client_leaves<T: Send + 'static>(
    operation: impl Future<Output = S3Result<S3Response<T>>> + Send + 'static,
) -> S3Future<'static, T> {
    Box::pin(async move {
        tokio::spawn(operation)
            .await
            .map_err(|e| s3_error!(InternalError, "the operation's task failed: {e}"))?
    })
}

fn decode_crc32c(value: &str) -> Option<u32> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// Bytes per read of a GET body from disk, and so per chunk sent. s3s-fs 0.14.1 reads objects
/// 4 KiB at a time through `tokio::fs`, each read a hand-off to the blocking pool: ~500k thread
/// wake-ups per 2 GiB, 7-12 CPU s of the server per 2 GiB download on the bench machine. That
/// made the server the bottleneck of every client's restore (and most of its noise), and 4 KiB
/// socket writes are far smaller than the TLS records and TCP segments a real store sends.
const GET_CHUNK: usize = 256 * 1024;

/// `first` of a `Content-Range: bytes first-last/size` answer.
fn range_start(content_range: &str) -> Option<u64> {
    let (first, _) = content_range.strip_prefix("bytes ")?.split_once('-')?;
    first.parse().ok()
}

/// An object's bytes `[offset, offset + len)` read from its file in [`GET_CHUNK`] reads.
struct FileBody {
    inner: tokio_util::io::ReaderStream<tokio::io::Take<tokio::fs::File>>,
    remaining: u64,
}

impl FileBody {
    async fn open(path: &Path, offset: u64, len: u64) -> io::Result<FileBody> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut file = tokio::fs::File::open(path).await?;
        file.seek(io::SeekFrom::Start(offset)).await?;
        Ok(FileBody {
            inner: tokio_util::io::ReaderStream::with_capacity(file.take(len), GET_CHUNK),
            remaining: len,
        })
    }
}

impl Stream for FileBody {
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                self.remaining = self.remaining.saturating_sub(bytes.len() as u64);
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(Box::new(err)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl ByteStream for FileBody {
    fn remaining_length(&self) -> RemainingLength {
        match usize::try_from(self.remaining) {
            Ok(n) => RemainingLength::new_exact(n),
            Err(_) => RemainingLength::unknown(),
        }
    }
}

/// A request body that computes CRC32C as it streams and fails at its end on a mismatch, so
/// s3s-fs never moves the part into place.
struct CrcCheckedBody {
    inner: StreamingBlob,
    crc: u32,
    expected: u32,
    verdict: Arc<Mutex<Option<bool>>>,
    done: bool,
}

impl Stream for CrcCheckedBody {
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                self.crc = crc32c::crc32c_append(self.crc, &bytes);
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(None) => {
                self.done = true;
                let ok = self.crc == self.expected;
                *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(ok);
                if ok {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err("checksum_crc32c mismatch".into())))
                }
            }
            other => other,
        }
    }
}

impl ByteStream for CrcCheckedBody {
    fn remaining_length(&self) -> RemainingLength {
        self.inner.remaining_length()
    }
}
