//! containerd's content store: blobs addressed by digest, with GC labels.

use bytes::Bytes;
use containerd_client::services::v1::{
    content_client::ContentClient, DeleteContentRequest, Info, InfoRequest, ReadContentRequest,
    UpdateRequest, WriteAction, WriteContentRequest,
};
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{Containerd, Lease};
use crate::{Error, Result};

pub struct ContentStore {
    c: Containerd,
    client: ContentClient<Channel>,
}

/// What a blob is expected to be and how it is labelled once committed.
pub struct WriteOptions<'a> {
    pub digest: &'a str,
    pub size: i64,
    pub labels: HashMap<String, String>,
    pub lease: &'a Lease,
}

impl ContentStore {
    pub(super) fn new(c: Containerd, client: ContentClient<Channel>) -> Self {
        ContentStore { c, client }
    }

    pub async fn info(&mut self, digest: &str) -> Result<Option<Info>> {
        match self
            .client
            .info(self.c.req(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(Error::containerd(format!("content info {digest}"), s)),
        }
    }

    /// Reads a whole (small) blob: manifests, configs, indexes.
    pub async fn read_all(&mut self, digest: &str) -> Result<Vec<u8>> {
        let mut stream = self
            .client
            .read(self.c.req(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|e| Error::containerd(format!("reading {digest}"), e))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|e| Error::containerd(format!("reading {digest}"), e))?
        {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    /// Adds (or replaces) labels on an existing blob.
    pub async fn set_labels(
        &mut self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.client
            .update(self.c.req(UpdateRequest {
                info: Some(Info {
                    digest: digest.to_string(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|e| Error::containerd(format!("labelling {digest}"), e))?;
        Ok(())
    }

    pub async fn delete(&mut self, digest: &str) -> Result<()> {
        self.client
            .delete(self.c.req(DeleteContentRequest {
                digest: digest.to_string(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("deleting {digest}"), e))?;
        Ok(())
    }

    /// Leases the blob, then looks: a blob an image removal just left to GC
    /// (the same image pulled again right after RemoveImage) is either kept
    /// by the lease or gone, never collected between the check and the
    /// labelling (critest's simultaneous RemoveImage spec caught that as
    /// NotFound). True when it exists; its labels are then updated.
    pub async fn keep_existing(&mut self, opts: &WriteOptions<'_>) -> Result<bool> {
        opts.lease.add_content(&self.c, opts.digest).await?;
        if self.info(opts.digest).await?.is_none() {
            return Ok(false);
        }
        self.set_labels(opts.digest, opts.labels.clone()).await?;
        Ok(true)
    }

    /// Writes a blob; containerd verifies size and digest at commit. If the
    /// blob already exists only its labels are updated.
    pub async fn write<S>(&mut self, opts: WriteOptions<'_>, data: S) -> Result<()>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        if self.keep_existing(&opts).await? {
            return Ok(());
        }
        self.write_new(opts, data).await
    }

    /// Writes a blob [`Self::keep_existing`] found missing (a concurrent
    /// writer committing first only updates its labels).
    pub async fn write_new<S>(&mut self, opts: WriteOptions<'_>, data: S) -> Result<()>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        // A ref per writer: concurrent pulls of one blob never wait on each
        // other's lock; the later commit gets AlreadyExists (handled below).
        let r#ref = format!("imacri-{}-{}", opts.digest, &crate::ids::new_id()[..8]);
        let labels = opts.labels.clone();
        let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
        // Requests flow while responses are read: containerd sends response
        // headers only after the first request arrives.
        let producer = async move {
            let mut offset = 0i64;
            let mut data = data;
            let closed = || Error::Internal("content write stream closed".to_string());
            while let Some(chunk) = data.next().await {
                let chunk = chunk?;
                let len = chunk.len() as i64;
                tx.send(WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: r#ref.clone(),
                    total: opts.size,
                    expected: opts.digest.to_string(),
                    offset,
                    data: chunk.to_vec(),
                    labels: HashMap::new(),
                })
                .await
                .map_err(|_| closed())?;
                offset += len;
                crate::crash::at("PullImage", "writing");
            }
            tx.send(WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: r#ref.clone(),
                total: opts.size,
                expected: opts.digest.to_string(),
                offset,
                data: Vec::new(),
                labels: opts.labels.clone(),
            })
            .await
            .map_err(|_| closed())?;
            Ok::<_, Error>(())
        };
        let request = self.c.leased(ReceiverStream::new(rx), opts.lease);
        let client = &mut self.client;
        let digest = opts.digest;
        let call = async move {
            let mut responses = client
                .write(request)
                .await
                .map_err(|e| Error::containerd(format!("writing {digest}"), e))?
                .into_inner();
            while responses
                .message()
                .await
                .map_err(|e| Error::containerd(format!("writing {digest}"), e))?
                .is_some()
            {}
            Ok::<_, Error>(())
        };
        let (produced, called) = futures::join!(producer, call);
        // containerd's answer explains a closed stream (e.g. another writer
        // committed the same blob first: AlreadyExists).
        let result = match (produced, called) {
            (_, Err(e)) => Err(e),
            (p, Ok(())) => p,
        };
        match result {
            Err(e) if e.is_already_exists() => self.set_labels(digest, labels).await,
            other => other,
        }
    }

    /// Writes a blob held in memory.
    pub async fn write_bytes(&mut self, opts: WriteOptions<'_>, data: Vec<u8>) -> Result<()> {
        let stream = futures::stream::iter(
            data.chunks(1 << 20)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        self.write(opts, stream).await
    }
}
