"""DataProto: row operations checked against the same operations on a plain list of rows."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verl.protocol import DataProto, as_object_array

settings.register_profile("protocol", max_examples=60, deadline=None)
settings.load_profile("protocol")


def make_proto(n: int) -> DataProto:
    """`n` distinct rows of tensors of several shapes and dtypes plus object columns."""
    return DataProto.from_dict(
        tensors={
            "input_ids": torch.arange(n * 3).reshape(n, 3),
            "log_probs": torch.arange(n * 4, dtype=torch.float32).reshape(n, 2, 2) / 4,
            "uid": torch.arange(n) + 100,
        },
        non_tensors={
            "prompt": [f"prompt {i}" for i in range(n)],
            "pair": [[i, -i] for i in range(n)],  # equal-length lists: must stay one list per row
            "ragged": [[i] * (i % 3) for i in range(n)],
        },
        meta_info={"temperature": 1.0},
    )


def rows_of(proto: DataProto) -> list[dict]:
    """The batch as a list of rows of plain Python values, to compare with list operations."""
    rows = [{} for _ in range(len(proto))]
    for key, tensor in proto.batch.items():
        for row, value in zip(rows, tensor.tolist()):
            row[key] = value
    for key, array in proto.non_tensor_batch.items():
        for row, value in zip(rows, array):
            row[key] = value
    return rows


def assert_same(actual: DataProto, expected: DataProto) -> None:
    """Same columns, dtypes, shapes, values and meta_info."""
    assert actual.batch.keys() == expected.batch.keys()
    assert actual.non_tensor_batch.keys() == expected.non_tensor_batch.keys()
    for key, tensor in expected.batch.items():
        assert actual.batch[key].dtype == tensor.dtype, key
        assert torch.equal(actual.batch[key], tensor), key
    for key, array in expected.non_tensor_batch.items():
        assert actual.non_tensor_batch[key].dtype == array.dtype, key
        assert actual.non_tensor_batch[key].shape == array.shape, key
        assert actual.non_tensor_batch[key].tolist() == array.tolist(), key
    assert actual.meta_info == expected.meta_info


sizes = st.integers(min_value=1, max_value=12)


def test_from_dict_keeps_one_list_per_row():
    proto = make_proto(3)
    assert len(proto) == 3
    assert proto.non_tensor_batch["pair"].shape == (3,)
    assert proto.non_tensor_batch["pair"][2] == [2, -2]
    assert proto.non_tensor_batch["prompt"].dtype == object
    assert len(DataProto()) == 0


def test_as_object_array_of_equal_length_lists_is_1d():
    array = as_object_array([[1, 2], [3, 4]])
    assert array.shape == (2,) and array[1] == [3, 4]


@given(n=sizes, chunks=st.integers(1, 4))
def test_chunk_then_concat_is_identity(n, chunks):
    proto = make_proto(n * chunks)
    pieces = proto.chunk(chunks)
    assert [len(piece) for piece in pieces] == [n] * chunks
    assert_same(DataProto.concat(pieces), proto)


@given(n=sizes, size=st.integers(1, 15))
def test_split_sizes_and_round_trip(n, size):
    proto = make_proto(n)
    pieces = proto.split(size)
    assert [len(piece) for piece in pieces] == [size] * (n // size) + ([n % size] if n % size else [])
    assert_same(DataProto.concat(pieces), proto)


@given(n=sizes, times=st.integers(1, 4))
def test_repeat_orders_rows_like_list_reference(n, times):
    proto = make_proto(n)
    rows = rows_of(proto)
    assert rows_of(proto.repeat(times, interleave=True)) == [row for row in rows for _ in range(times)]
    assert rows_of(proto.repeat(times, interleave=False)) == rows * times


@given(n=st.integers(0, 12), divisor=st.integers(1, 8))
def test_pad_to_divisor_cycles_rows_and_unpad_restores(n, divisor):
    proto = make_proto(n)
    padded, pad_size = proto.pad_to_divisor(divisor)
    assert len(padded) % divisor == 0 and 0 <= pad_size < divisor
    rows = rows_of(proto)
    assert rows_of(padded) == rows + [rows[i % n] for i in range(pad_size)]
    assert_same(padded.unpad(pad_size), proto)


def test_pad_to_divisor_hand_case():
    padded, pad_size = make_proto(3).pad_to_divisor(4)
    assert pad_size == 1
    assert padded.batch["uid"].tolist() == [100, 101, 102, 100]
    padded, pad_size = make_proto(2).pad_to_divisor(5)
    assert pad_size == 3
    assert padded.batch["uid"].tolist() == [100, 101, 100, 101, 100]


@given(data=st.data(), n=sizes)
def test_reorder_by_permutation_then_inverse_is_identity(data, n):
    proto = make_proto(n)
    permutation = data.draw(st.permutations(range(n)))
    reordered = proto.reorder(permutation)
    rows = rows_of(proto)
    assert rows_of(reordered) == [rows[i] for i in permutation]
    assert_same(reordered.reorder(np.argsort(permutation)), proto)


def test_reorder_rejects_non_permutation():
    with pytest.raises(ValueError, match=r"permutation of range\(3\)"):
        make_proto(3).reorder([0, 0, 1])


def index_strategy(n: int):
    """Every accepted index form, paired with the row numbers numpy picks for it."""
    ints = st.integers(-n, n - 1)
    as_rows = np.arange(n)
    return st.one_of(
        ints.map(lambda i: (i, [as_rows[i]])),
        st.builds(
            slice,
            st.none() | st.integers(-n - 2, n + 2),
            st.none() | st.integers(-n - 2, n + 2),
            st.sampled_from([None, 1, 2, -1, -3]),
        ).map(lambda s: (s, as_rows[s].tolist())),
        st.lists(ints, max_size=2 * n).map(lambda idx: (idx, as_rows[idx].tolist() if idx else [])),
        st.lists(ints, max_size=2 * n).map(
            lambda idx: (np.array(idx, dtype=np.int64), as_rows[idx].tolist() if idx else [])
        ),
        st.lists(ints, max_size=2 * n).map(
            lambda idx: (torch.tensor(idx, dtype=torch.long), as_rows[idx].tolist() if idx else [])
        ),
        st.lists(st.booleans(), min_size=n, max_size=n).map(
            lambda mask: (np.array(mask), as_rows[np.array(mask)].tolist())
        ),
        st.lists(st.booleans(), min_size=n, max_size=n).map(
            lambda mask: (torch.tensor(mask), as_rows[np.array(mask)].tolist())
        ),
    )


@given(data=st.data(), n=sizes)
def test_getitem_matches_numpy_indexing(data, n):
    proto = make_proto(n)
    index, expected_rows = data.draw(index_strategy(n))
    picked = proto[index]
    rows = rows_of(proto)
    assert rows_of(picked) == [rows[i] for i in expected_rows]
    assert picked.meta_info == proto.meta_info


def test_getitem_int_returns_one_row_batch():
    row = make_proto(4)[-1]
    assert len(row) == 1
    assert row.batch["input_ids"].shape == (1, 3)
    assert row.non_tensor_batch["pair"].tolist() == [[3, -3]]


def test_getitem_errors():
    proto = make_proto(3)
    with pytest.raises(IndexError, match="row 3 out of range for 3 rows"):
        proto[3]
    with pytest.raises(IndexError, match=r"boolean mask has shape \(2,\), expected \(3,\)"):
        proto[np.array([True, False])]
    with pytest.raises(IndexError, match="out of range for 3 rows"):
        proto[[0, -4]]


def test_select_shares_columns_and_copies_meta():
    proto = make_proto(3)
    picked = proto.select(batch_keys=["uid"], non_tensor_keys=["prompt"], meta_keys=[])
    assert list(picked.batch) == ["uid"] and list(picked.non_tensor_batch) == ["prompt"]
    assert picked.meta_info == {}
    assert picked.batch["uid"] is proto.batch["uid"]
    everything = proto.select()
    assert_same(everything, proto)
    everything.meta_info["step"] = 5
    assert "step" not in proto.meta_info
    with pytest.raises(KeyError, match=r"batch has no key\(s\) \['missing'\]"):
        proto.select(batch_keys=["missing"])


def test_pop_moves_columns_out_and_union_puts_them_back():
    proto = make_proto(4)
    original = proto.select()
    popped = proto.pop(batch_keys=["log_probs"], non_tensor_keys=["ragged"])
    assert sorted(popped.batch) == ["log_probs"] and sorted(popped.non_tensor_batch) == ["ragged"]
    assert "log_probs" not in proto.batch and "ragged" not in proto.non_tensor_batch
    assert popped.meta_info == original.meta_info
    assert_same(proto.union(popped), original)


def test_union_accepts_equal_shared_keys_and_names_the_conflicting_one():
    proto = make_proto(3)
    shared = proto.select(batch_keys=["uid"], non_tensor_keys=["pair"])
    same_values = DataProto.from_dict(
        {"uid": proto.batch["uid"].clone(), "new": torch.zeros(3)},
        {"pair": [[0, 0], [1, -1], [2, -2]]},
        {"temperature": 1.0},
    )
    union = shared.union(same_values)
    assert sorted(union.batch) == ["new", "uid"]
    conflicting = DataProto.from_dict({"uid": torch.tensor([100, 101, 7])})
    with pytest.raises(ValueError, match=r"batch\['uid'\] differs"):
        shared.union(conflicting)
    with pytest.raises(ValueError, match=r"non_tensor_batch\['pair'\] differs"):
        shared.union(DataProto.from_dict(non_tensors={"pair": [[0, 0], [1, -1], [2, 2]]}))
    with pytest.raises(ValueError, match=r"meta_info\['temperature'\] differs"):
        proto.union(DataProto(meta_info={"temperature": 0.5}))
    with pytest.raises(ValueError, match="batches have 3 and 2 rows"):
        shared.union(make_proto(2).select(batch_keys=["input_ids"], non_tensor_keys=[]))


def test_meta_only_batch_unions_with_any_length():
    union = make_proto(3).union(DataProto(meta_info={"step": 2}))
    assert len(union) == 3 and union.meta_info == {"temperature": 1.0, "step": 2}


def test_concat_takes_meta_info_from_first_and_requires_same_columns():
    first, second = make_proto(2), make_proto(1)
    second.meta_info["temperature"] = 0.0
    assert DataProto.concat([first, second]).meta_info == {"temperature": 1.0}
    with pytest.raises(ValueError, match="item 1 has columns"):
        DataProto.concat([first, second.select(batch_keys=["uid"])])
    with pytest.raises(ValueError, match="nothing to concatenate"):
        DataProto.concat([])


def test_chunk_requires_divisibility():
    with pytest.raises(ValueError, match="5 rows cannot be split into 2 equal chunks"):
        make_proto(5).chunk(2)


def test_construction_names_the_key_and_both_lengths():
    with pytest.raises(ValueError, match=r"batch\['b'\] has 4 rows but batch\['a'\] has 3"):
        DataProto.from_dict({"a": torch.zeros(3), "b": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match=r"non_tensor_batch\['text'\] has 2 rows but batch\['a'\] has 3"):
        DataProto.from_dict({"a": torch.zeros(3)}, {"text": ["x", "y"]})
    with pytest.raises(ValueError, match=r"batch\['scalar'\] is 0-dimensional"):
        DataProto.from_dict({"scalar": torch.tensor(1.0)})
    with pytest.raises(TypeError, match=r"non_tensor_batch\['text'\] must be a numpy.ndarray, got list"):
        DataProto(non_tensor_batch={"text": ["x"]})


def test_check_consistency_after_mutation():
    proto = make_proto(3)
    proto.batch["rewards"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"batch\['rewards'\] has 2 rows but batch\['input_ids'\] has 3"):
        proto.check_consistency()


def test_to_moves_tensors_and_keeps_arrays():
    proto = make_proto(2)
    moved = proto.to("meta")  # a real device type that needs no accelerator
    assert all(tensor.device.type == "meta" for tensor in moved.batch.values())
    assert moved.non_tensor_batch["prompt"] is proto.non_tensor_batch["prompt"]
    assert proto.batch["uid"].device.type == "cpu"
