"""A literal transcription of the CMU-MOSI course lab (``shared/seeds/001_...txt``), TODOs filled in.

This file is the independent reference for the fidelity test and the training benchmark: it imports nothing
from affectkit. Every class and function is the lab's code; the TODOs are filled in the obvious way.
Differences from the lab, all needed only to call it from a test or a benchmark:

- ``main()`` becomes :func:`run_lab` with the data path, epochs, seed and a folder for ``best_model.pth`` as
  arguments; it returns the test metrics, the 0-based best epoch and the per-epoch validation Corr;
- ``train_model`` takes the checkpoint path and returns ``(best_epoch, history)``; its inner loop over the
  batches is the function :func:`train_one_epoch` (the lab's loop body, unchanged) so the benchmark can time
  one epoch of it;
- ``torch.load(..., weights_only=True)``; ``device`` is always the CPU;
- the LSTM dropout warning (dropout with one layer) is silenced.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from sklearn.metrics import accuracy_score, f1_score
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, Dataset

# ----------------------------------------------------------------------------- 数据集加载


class MOSIDataset(Dataset):
    """The lab's dataset: the whole split in numpy, one ``torch.tensor`` per item and modality."""

    def __init__(self, data_path: str, split: str = "train") -> None:
        # Load the data from the pickle file
        with open(data_path, "rb") as f:
            data = pickle.load(f)

        # Select the appropriate split
        self.vision = data[split]["vision"]
        self.text = data[split]["text"]
        self.audio = data[split]["audio"]
        self.labels = data[split]["labels"]
        self.ids = data[split]["id"]

        # audio数据中存在坏点需要处理:
        self.audio[self.audio == float("inf")] = 0.0
        self.audio[self.audio == float("-inf")] = 0.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Extract the features and label for the given index
        vision = torch.tensor(self.vision[idx], dtype=torch.float32)
        text = torch.tensor(self.text[idx], dtype=torch.float32)
        audio = torch.tensor(self.audio[idx], dtype=torch.float32)
        label = torch.tensor(self.labels[idx], dtype=torch.float32).squeeze()

        return vision, text, audio, label


# ----------------------------------------------------------------------------- 模型构建


class MultimodalSentimentAnalysisModel(nn.Module):
    """The lab's LSTM baseline, in the lab's layer order."""

    def __init__(self) -> None:
        super().__init__()

        self.vision_norm = nn.LayerNorm(35)
        self.text_norm = nn.LayerNorm(300)
        self.audio_norm = nn.LayerNorm(74)

        self.vision_fc = nn.Linear(35, 128)
        self.text_fc = nn.Linear(300, 128)
        self.audio_fc = nn.Linear(74, 128)

        # hidden_size=128, num_layers=1, dropout=0.1, batch_first=True (torch warns: dropout needs 2+ layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.vision_lstm = nn.LSTM(128, 128, num_layers=1, dropout=0.1, batch_first=True)
            self.text_lstm = nn.LSTM(128, 128, num_layers=1, dropout=0.1, batch_first=True)
            self.audio_lstm = nn.LSTM(128, 128, num_layers=1, dropout=0.1, batch_first=True)
            self.mm_lstm = nn.LSTM(128, 128, num_layers=1, dropout=0.1, batch_first=True)

        # Define a fully connected layer for fusion
        self.fc = nn.Linear(128, 1)

    def forward(self, vision: torch.Tensor, text: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        # apply layernorm
        vision = self.vision_norm(vision)
        text = self.text_norm(text)
        audio = self.audio_norm(audio)

        # Process each modality
        vision = F.relu(self.vision_fc(vision))
        text = F.relu(self.text_fc(text))
        audio = F.relu(self.audio_fc(audio))

        # LSTM for temporal processing
        output_v, (vision_h, _) = self.vision_lstm(vision)
        output_t, (text_h, _) = self.text_lstm(text)
        output_a, (audio_h, _) = self.audio_lstm(audio)

        # 对单模态的LSTM输出进行直接相加得到feature
        feature = output_v + output_t + output_a
        _, (fusion_tensor, _) = self.mm_lstm(feature)

        # Concatenate the final hidden states
        output = self.fc(fusion_tensor[-1])

        # Apply sigmoid to constrain output to (0, 1)
        output = torch.sigmoid(output)
        # Scale and shift to range (-3, 3)
        output = output * 6 - 3

        return output


# ----------------------------------------------------------------------------- 评价指标


def eval_mosi_regression(y_pred: torch.Tensor, y_true: torch.Tensor, exclude_zero: bool = False) -> dict:
    """The lab's metric code (its swapped ``f1_score(pred, truth)`` and 4-decimal rounding included)."""
    test_preds = y_pred.view(-1).cpu().detach().numpy()
    test_truth = y_true.view(-1).cpu().detach().numpy()

    test_preds_a7 = np.clip(test_preds, a_min=-3.0, a_max=3.0)
    test_truth_a7 = np.clip(test_truth, a_min=-3.0, a_max=3.0)
    test_preds_a5 = np.clip(test_preds, a_min=-2.0, a_max=2.0)
    test_truth_a5 = np.clip(test_truth, a_min=-2.0, a_max=2.0)

    mae = np.mean(np.absolute(test_preds - test_truth))
    corr = np.corrcoef(test_preds, test_truth)[0][1]
    mult_a7 = multiclass_acc(test_preds_a7, test_truth_a7)
    mult_a5 = multiclass_acc(test_preds_a5, test_truth_a5)

    non_zeros = np.array([i for i, e in enumerate(test_truth) if e != 0])
    non_zeros_binary_truth = test_truth[non_zeros] > 0
    non_zeros_binary_preds = test_preds[non_zeros] > 0

    non_zeros_acc2 = accuracy_score(non_zeros_binary_preds, non_zeros_binary_truth)
    non_zeros_f1_score = f1_score(non_zeros_binary_preds, non_zeros_binary_truth, average="weighted")

    eval_results = {
        "Non0_acc_2": round(non_zeros_acc2, 4),
        "Non0_F1_score": round(non_zeros_f1_score, 4),
        "Mult_acc_5": round(mult_a5, 4),
        "Mult_acc_7": round(mult_a7, 4),
        "MAE": round(mae, 4),
        "Corr": round(corr, 4),
    }
    return eval_results


def multiclass_acc(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    """Overall fraction of equal rounded values (not per class)."""
    y_pred = np.round(y_pred)
    y_true = np.round(y_true)

    # Compute the accuracy
    acc = np.sum(y_pred == y_true) / float(len(y_true))

    return acc


# ----------------------------------------------------------------------------- 模型训练


def train_one_epoch(model: nn.Module, train_loader: DataLoader, criterion: nn.Module,
                    optimizer: optim.Optimizer, scheduler: Any, device: torch.device) -> float:
    """The body of the lab's epoch loop (unchanged); returns the summed batch losses."""
    model.train()
    running_loss = 0.0

    for i, (vision, text, audio, labels) in enumerate(train_loader):  # noqa: B007 (the lab's line)
        vision, text, audio, labels = vision.to(device), text.to(device), audio.to(device), labels.to(device)

        optimizer.zero_grad()

        # 模型前向获得输出:
        outputs = model(vision, text, audio)
        # 计算损失:
        loss = criterion(outputs.squeeze(), labels.squeeze())
        # 反向传播,计算梯度
        loss.backward()

        optimizer.step()
        scheduler.step()

        running_loss += loss.item()
    return running_loss


def train_model(model: nn.Module, train_loader: DataLoader, valid_loader: DataLoader, criterion: nn.Module,
                optimizer: optim.Optimizer, scheduler: Any, device: torch.device, epochs: int,
                save_path: str = "best_model.pth") -> tuple[int, list[dict[str, float]]]:
    """The lab's loop: select on (rounded) validation Corr, ``best_corr = 0`` and a strict ``>``."""
    model.to(device)

    best_corr = 0.0
    best_epoch = 0
    history = []

    for epoch in range(epochs):
        running_loss = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device)

        print(f"Epoch [{epoch+1}/{epochs}], Loss: {running_loss/len(train_loader):.4f}")

        val_corr = validate_model(model, valid_loader, criterion, device)
        history.append({"train_loss": running_loss / len(train_loader), "valid_corr": float(val_corr)})

        if val_corr > best_corr:
            best_corr = val_corr
            best_epoch = epoch
            torch.save(model.state_dict(), save_path)

    print(f"Best model saved with val_corr {best_corr} at epoch {best_epoch}.")
    return best_epoch, history


# ----------------------------------------------------------------------------- 模型验证


def validate_model(model: nn.Module, valid_loader: DataLoader, criterion: nn.Module, device: torch.device,
                   return_all: bool = False) -> Any:
    """The lab's validation pass; returns the (rounded) Corr, or every metric with ``return_all``."""
    model.eval()
    valid_loss = 0.0

    all_preds = []
    all_labels = []

    with torch.no_grad():
        for vision, text, audio, labels in valid_loader:
            vision, text, audio = vision.to(device), text.to(device), audio.to(device)
            labels = labels.to(device)

            outputs = model(vision, text, audio)
            loss = criterion(outputs.squeeze(), labels.squeeze())

            valid_loss += loss.item()

            all_preds.append(outputs)
            all_labels.append(labels)

    print(f"Validation Loss: {valid_loss/len(valid_loader):.4f}")

    all_preds = torch.cat(all_preds, dim=0)
    all_labels = torch.cat(all_labels, dim=0)

    # 计算评价指标
    eval_results = eval_mosi_regression(all_preds, all_labels)
    print(eval_results)

    if return_all:
        return {**eval_results, "loss": valid_loss / len(valid_loader)}
    return eval_results["Corr"]


# ----------------------------------------------------------------------------- 主函数


def seed_all(seed: int) -> None:
    """The lab's seeding block."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)


def setup(data_path: str, epochs: int = 20, seed: int = 42) -> dict[str, Any]:
    """``main()`` up to the call of train_model: seed, criterion, model, datasets, loaders, optimizer."""
    seed_all(seed)
    device = torch.device("cpu")

    criterion = nn.MSELoss()
    learning_rate = 1e-3

    model = MultimodalSentimentAnalysisModel()

    train_dataset = MOSIDataset(data_path, "train")
    valid_dataset = MOSIDataset(data_path, "valid")
    train_loader = DataLoader(train_dataset, batch_size=16, shuffle=True)
    valid_loader = DataLoader(valid_dataset, batch_size=16, shuffle=False)

    optimizer = optim.Adam(model.parameters(), lr=learning_rate)
    scheduler = CosineAnnealingLR(optimizer, T_max=epochs * len(train_loader))
    return {"device": device, "criterion": criterion, "model": model, "train_loader": train_loader,
            "valid_loader": valid_loader, "optimizer": optimizer, "scheduler": scheduler}


def run_lab(data_path: str, epochs: int = 20, seed: int = 42, save_dir: str | None = None) -> dict[str, Any]:
    """The lab's ``main()``: train, reload the best epoch, evaluate on test.

    Returns ``{"test": metrics (+ "loss"), "best_epoch": 0-based, "valid_corr": [...], "train_loss": [...]}``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        save_path = os.path.join(save_dir or tmp, "best_model.pth")
        s = setup(data_path, epochs, seed)
        model, criterion, device = s["model"], s["criterion"], s["device"]

        best_epoch, history = train_model(model, s["train_loader"], s["valid_loader"], criterion,
                                          s["optimizer"], s["scheduler"], device, epochs, save_path)

        # 加载最佳epoch参数
        best_model_state = torch.load(save_path, weights_only=True)
        model.load_state_dict(best_model_state)

    test_dataset = MOSIDataset(data_path, "test")
    test_loader = DataLoader(test_dataset, batch_size=16, shuffle=False)

    print("\n========== test results: ==========\n")
    test = validate_model(model, test_loader, criterion, device, return_all=True)
    return {"test": test, "best_epoch": best_epoch, "valid_corr": [h["valid_corr"] for h in history],
            "train_loss": [h["train_loss"] for h in history]}
