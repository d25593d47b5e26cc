//! Typed handlers behind one object-safe trait, so a service can hold methods of different
//! input and output types. Decoding the payload is done here, once, for every handler.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::{Context, TaskError};

pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;

/// A handler with its types erased.
pub(crate) trait ErasedHandler: Send + Sync + 'static {
    /// Decodes the payload and starts the handler; `Err` is a payload that does not fit.
    fn call(&self, ctx: Context, payload: Value) -> Result<HandlerFuture, String>;
}

pub(crate) struct Typed<F, In, Out> {
    f: F,
    _types: PhantomData<fn(In) -> Out>,
}

impl<F, In, Out> Typed<F, In, Out> {
    pub(crate) fn new(f: F) -> Self {
        Self {
            f,
            _types: PhantomData,
        }
    }
}

impl<F, Fut, In, Out> ErasedHandler for Typed<F, In, Out>
where
    F: Fn(Context, In) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Out, TaskError>> + Send + 'static,
    In: DeserializeOwned + 'static,
    Out: Serialize + 'static,
{
    fn call(&self, ctx: Context, payload: Value) -> Result<HandlerFuture, String> {
        let input: In = serde_json::from_value(payload).map_err(|e| e.to_string())?;
        let fut = (self.f)(ctx, input);
        Ok(Box::pin(async move {
            let out = fut.await?;
            serde_json::to_value(out)
                .map_err(|e| TaskError::reject(format!("result could not be encoded: {e}")))
        }))
    }
}
