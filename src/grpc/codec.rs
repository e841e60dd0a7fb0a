//! The protobuf codec of the generated code: prost's, except that a request that fails
//! to decode (a string field that is not UTF-8, say) is rejected with INVALID_ARGUMENT
//! instead of INTERNAL, because the caller sent it and must fix it.

use std::{any::type_name, marker::PhantomData};

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// prost's codec with request decoding errors mapped to INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        RequestCodec {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder {
            inner: ProstCodec::<T, U>::default().decoder(),
        }
    }
}

/// Decodes with prost and re-labels a failure to decode a request message.
#[derive(Debug, Clone)]
pub struct RequestDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| {
            // The server decodes only requests, and the client only responses, whose
            // decoding failures stay INTERNAL. Every request message's name ends in
            // `Request`.
            if status.code() == Code::Internal && type_name::<U>().ends_with("Request") {
                Status::invalid_argument(format!(
                    "{}; send valid protobuf with UTF-8 strings",
                    status.message()
                ))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
